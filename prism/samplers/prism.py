"""PRISM sampling (Kim, Kim, Lee et al. 2025): MDM steps that also remask the clean tokens of
lowest quality g_i, read from the same forward pass (``remask_rules.prism``; any remasking rule fits).

Let L be the number of generated (non-fixed) positions and N the steps; after step i the sequence
holds ⌈L·(i + 1)/N⌉ clean tokens, so each step unmasks ⌈L/N⌉ + |T| positions (uniformly random
among the masked ones, as the authors' Sudoku and OWT samplers) and remasks |T|:

- Algorithm 2: |T| ~ Binomial(#clean, η), from step ℓ_on (``step_on``) on;
  ``samplers.prism_owt``: η = 2.56/N and ℓ_on = ⌈N/2⌉ (Appendix D.2). ``cap`` (default for
  prism_owt, the authors' OWT code, ``prob_path._get_remasking_k`` / ``_topk_static_update``): the
  rate is min(η, (1 − α_s)/α_t) with α_t = #clean/L, α_s = min(#clean/L + 1/N, 1), and when more
  tokens are chosen than the step can refill (|T| > L − target) the excess, the best of the chosen
  by the remasking rule, stays clean, so every step ends at exactly its target; without ``cap``
  (samplers.prism's default, the paper's Algorithm 2 as written) the rate is η and such a step
  ends below its target;
- Algorithm 3: |T| = K fixed, while K < #masked < L − K (the authors' code; at #masked = K the
  step could not unmask ⌈L/N⌉ + K positions);
- never at the last step, which completes the sequence;
- Algorithm 4 (PRISM-loop): after the N steps, ``loop_steps`` more; each refills every masked
  position and, except the last, remasks ``loop_remask`` = M clean tokens (the last of the N steps
  already remasks M, so every loop step costs one pass and refills: NFE = N + N_l). Which M:
  ``loop_choice`` = 'uniform' (what the paper's text and the authors' code do: uniformly random
  clean tokens) or 'lowest' (lowest quality, by the sampler's remasking rule).

Remasking candidates are the tokens clean before the step: a token is never remasked in the step
that unmasked it (its quality was computed while it was still masked).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from prism.samplers.draw import CategoricalDraw
from prism.samplers.loop import Sampler
from prism.samplers.remask import PRISMRemask, RandomRemask, RemaskRule
from prism.samplers.rules import RandomUnmask, UnmaskRule
from prism.samplers.schedules import Schedule, StepPlan
from registry import SAMPLERS, SCHEDULES

LOOP_CHOICES = ("uniform", "lowest")


@SCHEDULES.register("prism")
class PRISMSchedule(Schedule):
    """Algorithms 2-4 of PRISM as counts: set ``eta`` (Algorithm 2) or ``num_remask`` = K
    (Algorithm 3); ``loop_steps`` / ``loop_remask`` add Algorithm 4."""

    remasks = True

    def __init__(self, steps: int = 128, eta: Optional[float] = None, num_remask: Optional[int] = None,
                 step_on: int = 0, step_off: Optional[int] = None, loop_steps: int = 0, loop_remask: int = 0,
                 cap: bool = False):
        if (eta is None) == (num_remask is None):
            raise ValueError("schedules.prism needs exactly one of eta (Algorithm 2) or num_remask (Algorithm 3)")
        if loop_steps and loop_remask <= 0:
            raise ValueError("PRISM-loop (loop_steps > 0) needs loop_remask > 0")
        self.n_steps, self.eta, self.num_remask = steps, eta, num_remask
        self.step_on, self.step_off = step_on, steps if step_off is None else step_off
        self.loop_steps, self.loop_remask, self.cap = loop_steps, loop_remask, cap

    def time(self, i):
        return 1.0 - i / self.n_steps, 1.0 - (i + 1) / self.n_steps

    @property
    def final_t(self) -> float:
        return 0.0

    def remask_rate(self, n_clean, L) -> torch.Tensor:
        """(B,) float64 Algorithm 2's rate: η, or with ``cap`` min(η, (1 − α_s)/α_t), α_t = #clean/L,
        α_s = min(α_t + 1/N, 1) (η where α_t = 0)."""
        eta = torch.full(n_clean.shape, self.eta, dtype=torch.float64)
        if not self.cap:
            return eta
        a_t = n_clean.double().cpu() / L.double().cpu()
        a_s = (a_t + 1.0 / self.n_steps).clamp(max=1.0)
        return torch.where(a_t > 0, torch.minimum(eta, (1 - a_s) / a_t.clamp(min=1e-300)), eta)

    def remask_count(self, i: int, n_masked, n_clean, L, generator):
        """|T| per row at step i (zero outside [step_on, step_off) and outside Algorithm 3's window)."""
        if not self.step_on <= i < self.step_off:
            return torch.zeros_like(n_masked)
        if self.eta is not None:
            T = torch.binomial(n_clean.double().cpu(), self.remask_rate(n_clean, L),
                               generator=generator).long().to(n_clean.device)
            ok = (n_clean > T) & (n_masked > T)
        else:
            T = torch.full_like(n_masked, self.num_remask)
            # K < #masked (strict, as the authors' code): at #masked = K the step would have to
            # unmask more positions than are masked; #clean > K is #masked < L − K.
            ok = (self.num_remask < n_masked) & (n_clean > self.num_remask)
        return torch.where(ok, T, torch.zeros_like(T))

    def plans(self, state):
        L = state.n_free
        for i in range(self.n_steps):
            t, s = self.time(i)
            n_masked, n_clean = state.n_masked, state.n_clean
            target = torch.ceil(L.double() * (i + 1) / self.n_steps).long()  # clean after this step
            T = self.remask_count(i, n_masked, n_clean, L, state.generator)
            if i == self.n_steps - 1:  # the last step completes the sequence (or starts the loop)
                T = torch.minimum(torch.full_like(T, self.loop_remask), n_clean) if self.loop_steps else torch.zeros_like(T)
            elif self.cap and self.eta is not None:  # the excess over what the step refills stays clean
                T = torch.minimum(T, (L - target).clamp(min=0))
            n_unmask = (target - n_clean + T).clamp(min=0)
            yield StepPlan(t, s, n_unmask=torch.minimum(n_unmask, n_masked), n_remask=T)
        for j in range(self.loop_steps):
            n_clean = state.n_clean
            last = j == self.loop_steps - 1
            T = torch.zeros_like(n_clean) if last else torch.minimum(torch.full_like(n_clean, self.loop_remask), n_clean)
            yield StepPlan(0.0, 0.0, n_unmask=state.n_masked, n_remask=T)


class LoopAwareRemask(RemaskRule):
    """PRISM-loop's choice: ``rule`` during the N steps, uniform (``loop_choice='uniform'``) or
    ``rule`` ('lowest') from the step that starts the loop on."""

    def __init__(self, rule: RemaskRule, n_steps: int, loop_choice: str):
        self.rule, self.n_steps, self.loop_choice = rule, n_steps, loop_choice
        self.uniform = RandomRemask()
        self.extra_passes = rule.extra_passes

    def scores(self, model, state, x_hat, generator):
        in_loop = state.step >= self.n_steps - 1
        if in_loop and self.loop_choice == "uniform":
            return self.uniform.scores(model, state, x_hat, generator)
        return self.rule.scores(model, state, x_hat, generator)


@SAMPLERS.register("prism")
def prism_sampler(steps: int = 128, eta: Optional[float] = None, num_remask: Optional[int] = None,
                  step_on: int = 0, step_off: Optional[int] = None, loop_steps: int = 0, loop_remask: int = 0,
                  loop_choice: str = "uniform", remask_rule: Optional[RemaskRule] = None,
                  unmask_rule: Optional[UnmaskRule] = None, temperature: float = 1.0, top_p: float = 1.0,
                  noise_removal: bool = True, cap: bool = False, nucleus: str = "within") -> Sampler:
    """PRISM Algorithms 2/3 (+ 4 with ``loop_steps``): remask by ``remask_rule`` (default: the PRISM
    head), unmask uniformly random positions (``unmask_rule``); ``cap``: Algorithm 2 as the authors'
    OWT code (see the module docstring); nucleus ``top_p`` read as ``nucleus`` ('within' | 'reach')."""
    if loop_choice not in LOOP_CHOICES:
        raise ValueError(f"unknown loop_choice {loop_choice!r}; known: {', '.join(LOOP_CHOICES)}")
    rule = remask_rule or PRISMRemask()
    if loop_steps:
        rule = LoopAwareRemask(rule, steps, loop_choice)
    return Sampler(PRISMSchedule(steps, eta, num_remask, step_on, step_off, loop_steps, loop_remask, cap),
                   unmask_rule or RandomUnmask(), CategoricalDraw(temperature, top_p, nucleus), noise_removal,
                   remask_rule=rule)


@SAMPLERS.register("prism_owt")
def prism_owt_sampler(steps: int = 256, top_p: float = 0.9, remask_rule: Optional[RemaskRule] = None,
                      loop_steps: int = 0, loop_remask: int = 0, loop_choice: str = "uniform", cap: bool = True,
                      nucleus: str = "within") -> Sampler:
    """Algorithm 2 with the OWT schedule of Appendix D.2: η = 2.56/N, ℓ_on = ⌈N/2⌉; by default as the
    authors' OWT code (``cap``: rate min(η, (1 − α_s)/α_t), steps end at their target; nucleus
    'within')."""
    return prism_sampler(steps, eta=2.56 / steps, step_on=math.ceil(steps / 2), loop_steps=loop_steps,
                         loop_remask=loop_remask, loop_choice=loop_choice, remask_rule=remask_rule, top_p=top_p,
                         cap=cap, nucleus=nucleus)

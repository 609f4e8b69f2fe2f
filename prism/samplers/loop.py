"""``samplers.loop``: the one step loop every sampler is built from.

Each step: the schedule plans the step (how many positions each row unmasks and remasks, or with
which probabilities, and optionally the window of positions it may touch) → one forward pass (or
the last one again when the state has not changed) gives the unmasking posterior and, with a head,
the per-token quality → the draw part draws tokens (``prism.samplers.draw``) at the masked positions
inside the window only, nothing for the others → the unmasking rule picks
which masked positions take them → the remasking rule picks which clean positions are masked again.
Every decision is per sequence. Fixed positions (givens, prompts, padding) never change.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from prism.samplers.draw import CategoricalDraw
from prism.ops import select_top
from prism.samplers.rules import RandomUnmask, UnmaskRule
from prism.samplers.schedules import MDLMSchedule, Schedule
from registry import SAMPLERS


@dataclass
class SampleOutput:
    """``tokens``: (B, L) final sequences; ``nfe``: network passes actually run (MDM passes plus
    any Token-Critic passes); ``trace``: per step, the state before the step, the quality the step
    saw and the positions it unmasked and remasked (if asked)."""

    tokens: torch.Tensor
    nfe: int
    trace: List[Dict[str, torch.Tensor]] = field(default_factory=list)


class SamplerState:
    """What the schedule and the rules may look at: the current state ``z``, ``fixed``, the model's
    last output (``log_probs``, ``quality``, ``token_log_probs``), ``confidence`` (B, L): the
    probability each clean token had when it was unmasked (NaN for masked and fixed positions), the
    step index and the generator."""

    def __init__(self, z, fixed, mask_id, generator):
        self.z, self.fixed, self.mask_id, self.generator = z, fixed, mask_id, generator
        self.confidence = torch.full(z.shape, float("nan"), dtype=torch.float64, device=z.device)
        self.log_probs = self.quality = self.token_log_probs = None
        self.attention_mask = None  # the batch's (B, L) padding mask, when it has one
        self.step = 0

    @property
    def masked(self) -> torch.Tensor:
        return (self.z == self.mask_id) & ~self.fixed

    @property
    def clean(self) -> torch.Tensor:
        """Generated (non-fixed) positions that hold a token."""
        return (self.z != self.mask_id) & ~self.fixed

    @property
    def n_masked(self) -> torch.Tensor:
        return self.masked.sum(1)

    @property
    def n_clean(self) -> torch.Tensor:
        return self.clean.sum(1)

    @property
    def n_free(self) -> torch.Tensor:
        return (~self.fixed).sum(1)


def choose(count: Optional[torch.Tensor], prob: Optional[torch.Tensor], candidates: torch.Tensor,
           scores_fn, generator) -> torch.Tensor:
    """(B, L) bool: by count, the top-``count`` candidates of ``scores_fn()`` per row; by probability,
    each candidate independently with ``prob`` ((B,) or (B, L))."""
    if count is not None:
        if not bool((count > 0).any()):
            return torch.zeros_like(candidates)
        return select_top(scores_fn(), candidates, count.to(candidates.device))
    if prob is not None:
        p = prob.to(torch.float64)
        p = p[:, None] if p.dim() == 1 else p
        u = torch.rand(candidates.shape, generator=generator, dtype=torch.float64).to(candidates.device)
        return (u < p.to(candidates.device)) & candidates
    return torch.zeros_like(candidates)


@SAMPLERS.register("loop")
class Sampler:
    """A sampler = schedule + unmasking rule + draw (+ remasking rule), run by one loop.

    ``noise_removal``: after the last step, positions still masked (MDLM's grid ends at t = eps > 0;
    a remasking step may leave masks) take the argmax of the model's prediction, as MDLM's final
    denoising step does. ``cache``: reuse the last prediction while the state is unchanged (MDLM's
    caching); off for time-conditioned models, whose prediction also depends on t.
    """

    def __init__(
        self,
        schedule: Schedule,
        unmask_rule: Optional[UnmaskRule] = None,
        draw: Optional[CategoricalDraw] = None,
        noise_removal: bool = True,
        cache: bool = True,
        remask_rule=None,
    ):
        self.schedule = schedule
        self.unmask_rule = unmask_rule or RandomUnmask()
        self.draw = draw or CategoricalDraw()
        self.noise_removal, self.cache = noise_removal, cache
        self.remask_rule = remask_rule

    @torch.no_grad()
    def __call__(self, model, batch, generator: Optional[torch.Generator] = None, trace: bool = False) -> SampleOutput:
        mask_id = model.mask_id
        fixed = batch["fixed"].bool()
        attention_mask = batch.get("attention_mask")
        z = torch.where(fixed, batch["input_ids"], torch.full_like(batch["input_ids"], mask_id))
        state = SamplerState(z, fixed, mask_id, generator)
        state.attention_mask = attention_mask  # rules that run a network of their own pass it on
        B = z.shape[0]
        cache = self.cache and not getattr(model, "time_conditioned", False)
        nfe, out, steps = 0, None, []

        def predict(t: float):
            nonlocal nfe
            nfe += 1
            return model(state.z, attention_mask=attention_mask, t=torch.full((B,), t, device=z.device))

        for i, plan in enumerate(self.schedule.plans(state)):
            state.step = i
            masked, clean = state.masked, state.clean
            if not masked.any() and not plan.may_remask:
                if self.schedule.remasks:
                    continue
                break
            if out is None or not cache:  # first step, or the state changed since the last prediction
                out = predict(plan.t)
            state.log_probs, state.token_log_probs = out.log_probs, getattr(out, "token_log_probs", None)
            state.quality = getattr(out, "quality_logits", None)
            window = plan.window if plan.window is not None else torch.ones_like(masked)
            # tokens only where one may change (masked, in the window); elsewhere the state as it is
            tokens = self.draw(out.log_probs, generator, positions=masked & window, fill=state.z)
            unmask = choose(plan.n_unmask, plan.p_unmask, masked & window,
                            lambda: self.unmask_rule.scores(out.log_probs, tokens, state.z, generator), generator)
            x_hat = torch.where(unmask, tokens, state.z)
            remask = torch.zeros_like(unmask)
            if plan.may_remask:
                if self.remask_rule is None and plan.n_remask is not None:
                    raise ValueError("this schedule remasks by count: give the sampler a remask_rule")
                candidates = ((x_hat != mask_id) & ~fixed if plan.remask_fresh else clean) & window

                def remask_scores():
                    nonlocal nfe
                    nfe += getattr(self.remask_rule, "extra_passes", 0)
                    return self.remask_rule.scores(model, state, x_hat, generator)

                remask = choose(plan.n_remask, plan.p_remask, candidates, remask_scores, generator)
            if trace:
                steps.append({"step": i, "t": plan.t, "z": state.z.cpu().clone(), "unmasked": unmask.cpu().clone(),
                              "remasked": remask.cpu().clone(),
                              "quality": None if state.quality is None else torch.sigmoid(state.quality.float()).cpu().clone()})
            token_p = out.log_probs.gather(-1, tokens[..., None]).squeeze(-1).double().exp()
            state.confidence = torch.where(unmask, token_p, state.confidence).masked_fill(remask, float("nan"))
            new_z = torch.where(remask, torch.full_like(x_hat, mask_id), x_hat)
            if not torch.equal(new_z, state.z):
                state.z = new_z
                out = None
        masked = state.masked
        if self.noise_removal and masked.any():
            if out is None or not cache:
                out = predict(self.schedule.final_t)
            state.z = torch.where(masked, out.log_probs.argmax(-1), state.z)
        return SampleOutput(tokens=state.z, nfe=nfe, trace=steps)


@SAMPLERS.register("mdlm")
def mdlm_sampler(
    steps: int = 128, eps: float = 1e-5, temperature: float = 1.0, top_p: float = 1.0, noise_removal: bool = True,
    noise=None,
) -> Sampler:
    """MDLM's ancestral sampler: ``schedules.mdlm`` (Binomial((α_s − α_t)/(1 − α_t)) unmasking) with
    uniformly random positions, categorical draws at the masked positions (``draws.categorical``),
    caching of unchanged steps."""
    return Sampler(MDLMSchedule(steps, eps, noise), RandomUnmask(), CategoricalDraw(temperature, top_p), noise_removal)

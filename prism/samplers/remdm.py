"""ReMDM (Wang et al. 2025, "Remasking Discrete Diffusion Models with Inference-Time Scaling"):
MDLM's reverse step generalised with a remasking probability σ_t. From t to s (α_t < α_s):

    clean token:   remasked with probability σ_t, kept with 1 − σ_t
    masked token:  unmasked with probability (α_s − (1 − σ_t)·α_t) / (1 − α_t)   (token ~ p_θ(· | z_t))

valid for 0 ≤ σ_t ≤ σ_max = min(1, (1 − α_s)/α_t). Strategies for σ_t (``strategy``):

    cap               σ = min(η, (1 − α_s)/α_t)
    rescale           σ = η · σ_max
    conf              σ_i = σ_max · softmax over clean positions of (−confidence when unmasked); masked
                      positions follow MDLM (σ = 0 there)
    loop              α(t) = α_on·(1 − t)/(1 − t_on) for t ≥ t_on (MDLM steps), α = α_on and σ = η for
                      t_off < t < t_on (the loop: as many tokens remasked as unmasked on average),
                      1 − α(t) = (1 − α_on)·t/t_off for t ≤ t_off (MDLM steps); at the two steps
                      that cross a phase boundary see ``loop_alpha``
    forward_backward  σ = (α_s − α_t)/α_t (the forward-backward corrector: a masked token unmasks
                      w.p. 2(α_s − α_t)/(1 − α_t))

Every position decides independently (per-position Bernoulli, per sequence).

Two readings, each an option, the authors' code (kuleshov-group/remdm, ``_ddpm_caching_update``)
the default:

- ``loop_alpha``: 'phase_of_t' (default, the authors' code) takes the phase from t alone (MDLM's
  first piece for t > t_on, the loop for t_off < t ≤ t_on, the last piece for t ≤ t_off) and uses
  that phase's α at both t and s, so the step from t > t_on to s ≤ t_on extrapolates the first piece
  (α_s > α_on) and the step from t > t_off to s ≤ t_off is a loop step at α_on; 'piecewise'
  evaluates the piecewise α(·) at t and at s (and loops only for t_off < t < t_on).
- ``conf_after_nucleus``: ReMDM-conf's stored confidence is the drawn token's probability after
  the nucleus filter and renormalising (default, the authors' code; ``draws.categorical``'s
  ``token_probs``) or, False, the model's probability before it (the loop's ``state.confidence``).
  They agree at top_p = 1 and τ = 1.
"""
from __future__ import annotations

from typing import Optional

import torch

from prism.masking import LOGLINEAR, NoiseSchedule
from prism.samplers.draw import CategoricalDraw
from prism.samplers.loop import Sampler
from prism.samplers.rules import RandomUnmask
from prism.samplers.schedules import Schedule, StepPlan
from registry import SAMPLERS, SCHEDULES

STRATEGIES = ("cap", "rescale", "conf", "loop", "forward_backward")
LOOP_ALPHAS = ("phase_of_t", "piecewise")


@SCHEDULES.register("remdm")
class ReMDMSchedule(Schedule):
    """ReMDM's σ-generalised MDLM step on the grid t_i = 1 → eps in ``steps`` steps. ReMDM-conf remasks
    by ``state.draw_confidence`` (``conf_after_nucleus``: the probability under the law the token was
    drawn from, which the loop keeps when its draw part keeps them) or ``state.confidence``."""

    remasks = True

    def __init__(self, steps: int = 128, strategy: str = "cap", eta: float = 0.02, t_on: float = 0.55,
                 t_off: float = 0.05, alpha_on: float = 0.9, eps: float = 1e-5, noise: Optional[NoiseSchedule] = None,
                 loop_alpha: str = "phase_of_t", conf_after_nucleus: bool = True):
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown ReMDM strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
        if loop_alpha not in LOOP_ALPHAS:
            raise ValueError(f"unknown loop_alpha {loop_alpha!r}; known: {', '.join(LOOP_ALPHAS)}")
        if strategy == "loop" and not (0 < t_off < t_on < 1 and 0 < alpha_on < 1):
            raise ValueError(f"ReMDM-loop needs 0 < t_off < t_on < 1 and 0 < alpha_on < 1, got {t_off}, {t_on}, {alpha_on}")
        if strategy == "loop" and eta > (1 - alpha_on) / alpha_on:
            raise ValueError(f"ReMDM-loop needs eta <= (1 - alpha_on)/alpha_on = {(1 - alpha_on) / alpha_on:.4g}")
        self.n_steps, self.strategy, self.eta = steps, strategy, eta
        self.t_on, self.t_off, self.alpha_on, self.eps = t_on, t_off, alpha_on, eps
        self.loop_alpha, self.conf_after_nucleus = loop_alpha, conf_after_nucleus
        self.noise = noise or LOGLINEAR
        self.grid = torch.linspace(1.0, eps, steps + 1, dtype=torch.float64)

    def time(self, i):
        return float(self.grid[i]), float(self.grid[i + 1])

    def alpha(self, t: float) -> float:
        """α(t): the noise schedule's, or ReMDM-loop's piecewise one."""
        if self.strategy != "loop":
            return float(self.noise.alpha(torch.tensor(t, dtype=torch.float64)))
        if t >= self.t_on:
            return self.alpha_on * (1 - t) / (1 - self.t_on)
        if t > self.t_off:
            return self.alpha_on
        return 1 - (1 - self.alpha_on) * t / self.t_off

    def loop_phase(self, t: float) -> str:
        """ReMDM-loop's phase of the step from t, as the authors' code decides it: 'on' (t > t_on),
        'loop' (t_off < t ≤ t_on) or 'off' (t ≤ t_off)."""
        return "on" if t > self.t_on else ("off" if t <= self.t_off else "loop")

    def alphas(self, t: float, s: float):
        """(α_t, α_s) of the step from t to s (for ReMDM-loop by ``loop_alpha``)."""
        if self.strategy != "loop" or self.loop_alpha == "piecewise":
            return self.alpha(t), self.alpha(s)
        phase = self.loop_phase(t)
        if phase == "on":
            return tuple(self.alpha_on * (1 - u) / (1 - self.t_on) for u in (t, s))
        if phase == "off":
            return tuple(1 - (1 - self.alpha_on) * u / self.t_off for u in (t, s))
        return self.alpha_on, self.alpha_on

    def sigma(self, t: float, s: float) -> float:
        """σ_t of the scalar strategies (conf is per position: see ``plans``)."""
        a_t, a_s = self.alphas(t, s)
        sigma_max = min(1.0, (1 - a_s) / a_t) if a_t > 0 else 1.0
        if self.strategy == "cap":
            return min(self.eta, (1 - a_s) / a_t) if a_t > 0 else self.eta
        if self.strategy == "rescale":
            return self.eta * sigma_max
        if self.strategy == "forward_backward":
            return (a_s - a_t) / a_t if a_t > 0 else 1.0
        if self.strategy == "loop":
            if self.loop_alpha == "piecewise":
                return self.eta if self.t_off < t < self.t_on else 0.0
            return self.eta if self.loop_phase(t) == "loop" else 0.0
        return sigma_max  # conf: the budget that the softmax distributes

    def unmask_probability(self, t: float, s: float, sigma: float) -> float:
        """(α_s − (1 − σ)·α_t) / (1 − α_t), clipped to [0, 1]."""
        a_t, a_s = self.alphas(t, s)
        return min(1.0, max(0.0, (a_s - (1 - sigma) * a_t) / (1 - a_t)))

    def plans(self, state):
        B = state.z.shape[0]
        for i in range(self.n_steps):
            t, s = self.time(i)
            sigma = self.sigma(t, s)
            if self.strategy == "conf":
                clean = state.clean
                kept = self.conf_after_nucleus and getattr(state, "draw_probs_kept", False)
                confidence = state.draw_confidence if kept else state.confidence
                logits = (-confidence).masked_fill(~clean, float("-inf"))
                weights = torch.softmax(logits, dim=1).nan_to_num(0.0)  # rows with no clean token: 0
                yield StepPlan(t, s, p_unmask=torch.full((B,), self.unmask_probability(t, s, 0.0)),
                               p_remask=sigma * weights)
            else:
                yield StepPlan(t, s, p_unmask=torch.full((B,), self.unmask_probability(t, s, sigma)),
                               p_remask=torch.full((B,), min(1.0, sigma)))


@SAMPLERS.register("remdm")
def remdm_sampler(steps: int = 128, strategy: str = "cap", eta: float = 0.02, t_on: float = 0.55, t_off: float = 0.05,
                  alpha_on: float = 0.9, eps: float = 1e-5, temperature: float = 1.0, top_p: float = 1.0,
                  noise_removal: bool = True, noise=None, nucleus: str = "within", loop_alpha: str = "phase_of_t",
                  conf_after_nucleus: bool = True) -> Sampler:
    """ReMDM sampling (cap | rescale | conf | loop | forward_backward): ``schedules.remdm`` with
    categorical draws (``draws.categorical``) and nucleus ``top_p`` read as ``nucleus``
    ('within' | 'reach'); ``loop_alpha`` and ``conf_after_nucleus``: see the module docstring."""
    keep = strategy == "conf" and conf_after_nucleus
    draw = CategoricalDraw(temperature, top_p, nucleus, keep_probs=keep)
    return Sampler(ReMDMSchedule(steps, strategy, eta, t_on, t_off, alpha_on, eps, noise, loop_alpha,
                                 conf_after_nucleus), RandomUnmask(), draw, noise_removal)

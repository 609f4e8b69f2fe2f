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
                      1 − α(t) = (1 − α_on)·t/t_off for t ≤ t_off (MDLM steps)
    forward_backward  σ = (α_s − α_t)/α_t (the forward-backward corrector: a masked token unmasks
                      w.p. 2(α_s − α_t)/(1 − α_t))

Every position decides independently (per-position Bernoulli, per sequence).
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


@SCHEDULES.register("remdm")
class ReMDMSchedule(Schedule):
    """ReMDM's σ-generalised MDLM step on the grid t_i = 1 → eps in ``steps`` steps."""

    remasks = True

    def __init__(self, steps: int = 128, strategy: str = "cap", eta: float = 0.02, t_on: float = 0.55,
                 t_off: float = 0.05, alpha_on: float = 0.9, eps: float = 1e-5, noise: Optional[NoiseSchedule] = None):
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown ReMDM strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
        if strategy == "loop" and not (0 < t_off < t_on < 1 and 0 < alpha_on < 1):
            raise ValueError(f"ReMDM-loop needs 0 < t_off < t_on < 1 and 0 < alpha_on < 1, got {t_off}, {t_on}, {alpha_on}")
        if strategy == "loop" and eta > (1 - alpha_on) / alpha_on:
            raise ValueError(f"ReMDM-loop needs eta <= (1 - alpha_on)/alpha_on = {(1 - alpha_on) / alpha_on:.4g}")
        self.n_steps, self.strategy, self.eta = steps, strategy, eta
        self.t_on, self.t_off, self.alpha_on, self.eps = t_on, t_off, alpha_on, eps
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

    def sigma(self, t: float, s: float) -> float:
        """σ_t of the scalar strategies (conf is per position: see ``plans``)."""
        a_t, a_s = self.alpha(t), self.alpha(s)
        sigma_max = min(1.0, (1 - a_s) / a_t) if a_t > 0 else 1.0
        if self.strategy == "cap":
            return min(self.eta, (1 - a_s) / a_t) if a_t > 0 else self.eta
        if self.strategy == "rescale":
            return self.eta * sigma_max
        if self.strategy == "forward_backward":
            return (a_s - a_t) / a_t if a_t > 0 else 1.0
        if self.strategy == "loop":
            return self.eta if self.t_off < t < self.t_on else 0.0
        return sigma_max  # conf: the budget that the softmax distributes

    def unmask_probability(self, t: float, s: float, sigma: float) -> float:
        """(α_s − (1 − σ)·α_t) / (1 − α_t)."""
        a_t, a_s = self.alpha(t), self.alpha(s)
        return min(1.0, max(0.0, (a_s - (1 - sigma) * a_t) / (1 - a_t)))

    def plans(self, state):
        B = state.z.shape[0]
        for i in range(self.n_steps):
            t, s = self.time(i)
            sigma = self.sigma(t, s)
            if self.strategy == "conf":
                clean = state.clean
                logits = (-state.confidence).masked_fill(~clean, float("-inf"))
                weights = torch.softmax(logits, dim=1).nan_to_num(0.0)  # rows with no clean token: 0
                yield StepPlan(t, s, p_unmask=torch.full((B,), self.unmask_probability(t, s, 0.0)),
                               p_remask=sigma * weights)
            else:
                yield StepPlan(t, s, p_unmask=torch.full((B,), self.unmask_probability(t, s, sigma)),
                               p_remask=torch.full((B,), min(1.0, sigma)))


@SAMPLERS.register("remdm")
def remdm_sampler(steps: int = 128, strategy: str = "cap", eta: float = 0.02, t_on: float = 0.55, t_off: float = 0.05,
                  alpha_on: float = 0.9, eps: float = 1e-5, temperature: float = 1.0, top_p: float = 1.0,
                  noise_removal: bool = True, noise=None) -> Sampler:
    """ReMDM sampling (cap | rescale | conf | loop | forward_backward): ``schedules.remdm`` with
    categorical draws (``draws.categorical``) and nucleus ``top_p``."""
    return Sampler(ReMDMSchedule(steps, strategy, eta, t_on, t_off, alpha_on, eps, noise), RandomUnmask(),
                   CategoricalDraw(temperature, top_p), noise_removal)

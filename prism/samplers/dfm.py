"""The discrete flow matching corrector sampler (Gat et al. 2024, "Discrete Flow Matching"; as run
in ReMDM's and PRISM's comparisons), for the log-linear path α_t = 1 − t (t = 1 all masks).

With a_t = 10·t^¼·(1 − t)^¼ + 1 and b_t = a_t − 1, a step from t to s = t − dt does

    masked token:  unmasked with probability a_t·(α_s − α_t)/(1 − α_t)       (= a_t·dt/t)
    clean token:   remasked with probability b_t·(α_s/α_t − 1)                 (= b_t·dt/(1 − t))

with the adaptive step dt = min(1/N, 1/(a_t/t + b_t/(1 − t))) so that neither probability exceeds 1;
the first step (t = 1, where b_t/(1 − t) is undefined) is a plain MDLM step of dt = 1/N. The loop
runs while t > (1 − eps)/N; the number of steps (and NFE) therefore depends on N, not equal to it.
"""
from __future__ import annotations

import torch

from prism.samplers.draw import CategoricalDraw
from prism.samplers.loop import Sampler
from prism.samplers.rules import RandomUnmask
from prism.samplers.schedules import Schedule, StepPlan
from registry import SAMPLERS, SCHEDULES


def dfm_rates(t: float):
    """(a_t, b_t) of the DFM corrector."""
    a = 10.0 * t ** 0.25 * (1.0 - t) ** 0.25 + 1.0
    return a, a - 1.0


@SCHEDULES.register("dfm")
class DFMSchedule(Schedule):
    remasks = True

    def __init__(self, steps: int = 128, eps: float = 1e-5, max_steps: int = 100_000):
        self.n_steps, self.eps, self.max_steps = steps, eps, max_steps

    @property
    def final_t(self) -> float:
        return self.eps

    def step_size(self, t: float) -> float:
        if t >= 1.0:
            return 1.0 / self.n_steps
        a, b = dfm_rates(t)
        return min(1.0 / self.n_steps, 1.0 / (a / t + b / (1.0 - t)))

    def plans(self, state):
        B = state.z.shape[0]
        t, n = 1.0, 0
        while t > (1.0 - self.eps) / self.n_steps and n < self.max_steps:
            dt = self.step_size(t)
            s = max(t - dt, 0.0)
            if t >= 1.0:
                p_u, p_r = dt / t, 0.0
            else:
                a, b = dfm_rates(t)
                p_u, p_r = a * (t - s) / t, b * (t - s) / (1.0 - t)  # a(α_s − α_t)/(1 − α_t), b(α_s/α_t − 1)
            yield StepPlan(t, s, p_unmask=torch.full((B,), min(1.0, p_u)), p_remask=torch.full((B,), min(1.0, p_r)))
            t, n = s, n + 1


@SAMPLERS.register("dfm")
def dfm_sampler(steps: int = 128, eps: float = 1e-5, temperature: float = 1.0, top_p: float = 1.0,
                noise_removal: bool = True) -> Sampler:
    """The DFM corrector sampler (works at any nucleus p, including p = 1)."""
    return Sampler(DFMSchedule(steps, eps), RandomUnmask(), CategoricalDraw(temperature, top_p), noise_removal)

"""Schedules: how many tokens each sequence unmasks (and remasks) at each step.

A schedule sees the step index and the per-row counts of masked / clean positions and returns per-row
counts; *which* positions is the rules' business (``prism.samplers.rules``).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from prism.masking import LOGLINEAR, NoiseSchedule
from registry import SCHEDULES


class Schedule:
    """``n_steps`` steps; ``time(i)`` gives (t, s) for step i; ``counts`` the per-row numbers."""

    n_steps: int

    def time(self, i: int) -> Tuple[float, float]:
        raise NotImplementedError

    def counts(
        self, i: int, n_masked: torch.Tensor, n_clean: torch.Tensor, generator: Optional[torch.Generator]
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(n_unmask, n_remask), each (B,) long, for step ``i``."""
        raise NotImplementedError


@SCHEDULES.register("mdlm")
class MDLMSchedule(Schedule):
    """MDLM ancestral sampling (Sahoo et al. 2024, Eq. 7): on the grid t_i from 1 to ``eps`` in
    ``steps`` steps, each masked token unmasks at step t → s with probability

        (α_s − α_t) / (1 − α_t)    (= (t − s) / t for the default log-linear α_t = 1 − t),

    independently; so the count is Binomial(#masked, (t − s)/t) and, drawn with the ``random``
    unmasking rule, the chosen set is a uniform subset of that size — the same law. Nothing is
    remasked."""

    def __init__(self, steps: int = 128, eps: float = 1e-5, noise: Optional[NoiseSchedule] = None):
        if steps < 1:
            raise ValueError(f"schedules.mdlm.steps must be >= 1, got {steps}")
        self.n_steps, self.eps = steps, eps
        self.noise = noise or LOGLINEAR
        self.grid = torch.linspace(1.0, eps, steps + 1, dtype=torch.float64)

    def time(self, i):
        return float(self.grid[i]), float(self.grid[i + 1])

    def unmask_probability(self, i: int) -> float:
        """(α_s − α_t) / (1 − α_t) for step i from t to s."""
        a_t, a_s = self.noise.alpha(self.grid[i]), self.noise.alpha(self.grid[i + 1])
        return float((a_s - a_t) / (1 - a_t))

    def counts(self, i, n_masked, n_clean, generator):
        p = torch.full(n_masked.shape, self.unmask_probability(i), dtype=torch.float64)
        n = torch.binomial(n_masked.double().cpu(), p, generator=generator).long().to(n_masked.device)
        return n, torch.zeros_like(n)


@SCHEDULES.register("fixed_count")
class FixedCountSchedule(Schedule):
    """Deterministic: unmask ⌈#masked_0 / steps⌉-style equal shares so that every sequence is fully
    unmasked after exactly ``steps`` steps (the count schedule of LLaDA / MaskGIT-style samplers).
    At step i a row with m masked tokens unmasks ⌈m / (steps − i)⌉."""

    def __init__(self, steps: int = 128):
        if steps < 1:
            raise ValueError(f"schedules.fixed_count.steps must be >= 1, got {steps}")
        self.n_steps = steps

    def time(self, i):
        return 1.0 - i / self.n_steps, 1.0 - (i + 1) / self.n_steps

    def counts(self, i, n_masked, n_clean, generator):
        left = self.n_steps - i
        return (n_masked + left - 1) // left, torch.zeros_like(n_masked)

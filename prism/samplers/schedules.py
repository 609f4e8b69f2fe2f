"""Schedules: how many tokens each sequence unmasks (and remasks) at each step, or with which
probabilities.

A schedule plans each step (``plans(state)`` yields one ``StepPlan`` per step, reading the sampler's
live state); *which* positions is the rules' business (``prism.samplers.rules``) when the plan gives
counts. Simple count schedules only implement ``time(i)`` and ``counts(i, n_masked, n_clean, g)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import torch

from prism.masking import LOGLINEAR, NoiseSchedule
from registry import SCHEDULES


@dataclass
class StepPlan:
    """One step, from time ``t`` to ``s``. Per row either counts (``n_unmask`` / ``n_remask``, (B,)
    long: the rules pick the positions) or probabilities (``p_unmask`` / ``p_remask``, (B,) or
    (B, L): every candidate position independently). Unmasking candidates are the masked positions,
    remasking candidates the clean generated positions before the step (``remask_fresh``: also those
    unmasked in this step, as Token-Critic re-decides every position); both within ``window``
    ((B, L) bool, e.g. the current semi-autoregressive block) when given. ``block_start``: a row
    begins a new window, ``starts`` which ones (a KV-cached sampler refreshes those rows' cache);
    ``threshold``: parallel decoding (Fast-dLLM), every candidate whose drawn token has probability
    ≥ τ unmasks beyond the count."""

    t: float
    s: float
    n_unmask: Optional[torch.Tensor] = None
    p_unmask: Optional[torch.Tensor] = None
    n_remask: Optional[torch.Tensor] = None
    p_remask: Optional[torch.Tensor] = None
    window: Optional[torch.Tensor] = None
    remask_fresh: bool = False
    block_start: bool = False  # some row starts a new window here: a KV cache is refreshed
    starts: Optional[torch.Tensor] = None  # (B,) bool: the rows that start a window (None: all if block_start)
    threshold: Optional[float] = None  # also unmask every candidate whose drawn token has p >= threshold

    @property
    def may_remask(self) -> bool:
        if self.n_remask is not None:
            return bool((self.n_remask > 0).any())
        return self.p_remask is not None and bool((self.p_remask > 0).any())


class Schedule:
    """``n_steps`` steps; ``time(i)`` gives (t, s) for step i; ``counts`` the per-row numbers;
    ``plans`` the steps (by default from ``time`` and ``counts``). ``remasks``: whether any step may
    remask (then the loop keeps going when nothing is masked)."""

    n_steps: int
    remasks: bool = False

    @property
    def final_t(self) -> float:
        """The time of the final noise-removal pass."""
        return float(self.time(self.n_steps - 1)[1])

    def time(self, i: int) -> Tuple[float, float]:
        raise NotImplementedError

    def plans(self, state) -> Iterator[StepPlan]:
        for i in range(self.n_steps):
            t, s = self.time(i)
            n_unmask, n_remask = self.counts(i, state.n_masked, state.n_clean, state.generator)
            yield StepPlan(t, s, n_unmask=n_unmask, n_remask=n_remask)

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

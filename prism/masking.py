"""The forward (masking) process: noise schedules α_t (``noise.loglinear``, MDLM's default α_t = 1 − t,
and ``noise.cosine``), t sampling, masking.

Positions marked ``fixed`` (givens, separators, prompts, padding) are never masked.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from registry import NOISE


class NoiseSchedule:
    """α_t: the probability that a token is still clean at time t ∈ [0, 1] (α_0 = 1, α_1 = 0).

    ``weight(t)`` = −α'_t / (1 − α_t), the NELBO weight of the cross-entropy at t (MDLM Eq. 10)."""

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@NOISE.register("loglinear")
class LogLinear(NoiseSchedule):
    """MDLM's log-linear schedule: α_t = 1 − t, weight 1/t."""

    def alpha(self, t):
        return 1.0 - t

    def weight(self, t):
        return 1.0 / t


@NOISE.register("cosine")
class Cosine(NoiseSchedule):
    """α_t = cos(πt/2) (MaskGIT / MD4): fewer masks early in t, more late; weight
    (π/2)·sin(πt/2) / (1 − cos(πt/2))."""

    def alpha(self, t):
        return torch.cos(0.5 * math.pi * t)

    def weight(self, t):
        return 0.5 * math.pi * torch.sin(0.5 * math.pi * t) / (1.0 - torch.cos(0.5 * math.pi * t))


LOGLINEAR = LogLinear()


def sample_t(
    batch_size: int, eps: float = 1e-3, antithetic: bool = True, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """t ~ U[eps, 1] per sequence; antithetic (stratified) sampling as MDLM's ``_sample_t``:
    u_b = (u/B + b/B) mod 1, so a batch covers [0, 1) evenly and the loss has lower variance."""
    u = torch.rand(batch_size, generator=generator)
    if antithetic:
        u = (u / batch_size + torch.arange(batch_size) / batch_size) % 1.0
    return (1.0 - eps) * u + eps


def limit_to_window(fixed: torch.Tensor, window: Optional[int]) -> torch.Tensor:
    """``fixed`` with every non-fixed position after the first ``window`` of its row also fixed (None:
    unchanged). PRISM's LLaDA recipe masks only the first 512 answer tokens (``cumsum <= 512``): the
    semi-AR sampler never shows the model a sequence masked further right than its window."""
    if window is None:
        return fixed
    if window < 1:
        raise ValueError(f"a mask window must be a positive number of positions, got {window}")
    return fixed | ((~fixed).long().cumsum(1) > window)


def mask_tokens(
    x: torch.Tensor,
    t: torch.Tensor,
    mask_id: int,
    fixed: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    noise: Optional[NoiseSchedule] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Draw z_t ~ q(z_t | x): each non-fixed token becomes ``mask_id`` with probability 1 − α_t
    (= t for the default log-linear schedule).

    Returns (z, masked) where ``masked`` (B, L) bool marks the positions that were masked.
    """
    u = torch.rand(x.shape, generator=generator).to(x.device)
    masked = u < (1.0 - (noise or LOGLINEAR).alpha(t)).to(x.device)[:, None]
    if fixed is not None:
        masked &= ~fixed
    return torch.where(masked, torch.full_like(x, mask_id), x), masked

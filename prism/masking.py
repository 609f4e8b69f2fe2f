"""The forward (masking) process of MDLM with the log-linear schedule α_t = 1 − t.

Positions marked ``fixed`` (givens, separators, prompts, padding) are never masked.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def alpha(t: torch.Tensor) -> torch.Tensor:
    """Log-linear schedule of MDLM: α_t = 1 − t, the probability that a token is still clean at t."""
    return 1.0 - t


def sample_t(
    batch_size: int, eps: float = 1e-3, antithetic: bool = True, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """t ~ U[eps, 1] per sequence; antithetic (stratified) sampling as MDLM's ``_sample_t``:
    u_b = (u/B + b/B) mod 1, so a batch covers [0, 1) evenly and the loss has lower variance."""
    u = torch.rand(batch_size, generator=generator)
    if antithetic:
        u = (u / batch_size + torch.arange(batch_size) / batch_size) % 1.0
    return (1.0 - eps) * u + eps


def mask_tokens(
    x: torch.Tensor,
    t: torch.Tensor,
    mask_id: int,
    fixed: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Draw z_t ~ q(z_t | x): each non-fixed token becomes ``mask_id`` with probability 1 − α_t = t.

    Returns (z, masked) where ``masked`` (B, L) bool marks the positions that were masked.
    """
    u = torch.rand(x.shape, generator=generator).to(x.device)
    masked = u < (1.0 - alpha(t)).to(x.device)[:, None]
    if fixed is not None:
        masked &= ~fixed
    return torch.where(masked, torch.full_like(x, mask_id), x), masked

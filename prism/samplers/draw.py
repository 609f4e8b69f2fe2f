"""How tokens are drawn: Gumbel-max in float64 with temperature and nucleus (top-p) filtering.

float64 matters: with float32 Gumbel noise, low-probability tokens are drawn measurably less often
than they should be (Zheng et al. 2024, "Masked diffusion models are secretly time-agnostic masked
models and exploit inaccurate categorical sampling"), which lowers diversity.
"""
from __future__ import annotations

from typing import Optional

import torch

from registry import DRAWS


def nucleus_filter(log_probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability sums to at least ``top_p`` (Holtzman et al.
    2020); the rest get −inf. ``top_p >= 1`` keeps everything."""
    if top_p >= 1.0:
        return log_probs
    sorted_lp, order = torch.sort(log_probs, dim=-1, descending=True)
    cum = sorted_lp.exp().cumsum(-1)
    # Drop a token when the mass strictly before it already reaches top_p (the top token always stays).
    drop_sorted = (cum - sorted_lp.exp()) >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return log_probs.masked_fill(drop, float("-inf"))


def gumbel_max(
    log_probs: torch.Tensor,
    generator: Optional[torch.Generator] = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
) -> torch.Tensor:
    """Draw one token per position from softmax(log_probs / temperature) after nucleus filtering,
    by argmax(log_probs + Gumbel noise) in float64. ``temperature == 0`` is greedy argmax."""
    lp = log_probs.double()
    if temperature == 0:
        return nucleus_filter(lp, top_p).argmax(-1)
    lp = torch.log_softmax(lp / temperature, dim=-1) if temperature != 1.0 else lp
    lp = nucleus_filter(lp, top_p)
    u = torch.rand(lp.shape, generator=generator, dtype=torch.float64).to(lp.device)
    gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))
    return (lp + gumbel).argmax(-1)


@DRAWS.register("gumbel")
class GumbelDraw:
    """The draw part of a sampler: ``gumbel_max`` with fixed temperature and nucleus p."""

    def __init__(self, temperature: float = 1.0, top_p: float = 1.0):
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
        self.temperature, self.top_p = temperature, top_p

    def __call__(self, log_probs: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return gumbel_max(log_probs, generator, self.temperature, self.top_p)

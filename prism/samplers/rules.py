"""Rules: which positions. An unmasking rule scores masked positions (highest first); the loop takes
each row's top-n by score among its candidates.
"""
from __future__ import annotations

from typing import Optional

import torch

from registry import UNMASK_RULES


def select_top(scores: torch.Tensor, candidates: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: for each row b, the ``counts[b]`` candidate positions with the highest scores
    (fewer if the row has fewer candidates)."""
    scores = scores.double().masked_fill(~candidates, float("-inf"))
    order = torch.argsort(scores, dim=1, descending=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
    return (rank < counts[:, None]) & candidates


class UnmaskRule:
    """``scores(log_probs, tokens, z, generator)`` → (B, L) float; higher unmasks first."""

    def scores(self, log_probs, tokens, z, generator: Optional[torch.Generator]) -> torch.Tensor:
        raise NotImplementedError


@UNMASK_RULES.register("random")
class RandomUnmask(UnmaskRule):
    """Uniformly random positions (MDLM ancestral sampling)."""

    def scores(self, log_probs, tokens, z, generator):
        return torch.rand(z.shape, generator=generator, dtype=torch.float64).to(z.device)


@UNMASK_RULES.register("confidence")
class ConfidenceUnmask(UnmaskRule):
    """Highest probability of the drawn token first (LLaDA's low-confidence remasking)."""

    def scores(self, log_probs, tokens, z, generator):
        return log_probs.gather(-1, tokens[..., None]).squeeze(-1)


@UNMASK_RULES.register("margin")
class MarginUnmask(UnmaskRule):
    """Largest gap between the two most probable tokens first (Kim et al. 2025, top-2 margin)."""

    def scores(self, log_probs, tokens, z, generator):
        top2 = log_probs.exp().topk(2, dim=-1).values
        return top2[..., 0] - top2[..., 1]


@UNMASK_RULES.register("left_to_right")
class LeftToRightUnmask(UnmaskRule):
    """Leftmost masked positions first."""

    def scores(self, log_probs, tokens, z, generator):
        L = z.shape[1]
        return -torch.arange(L, device=z.device, dtype=torch.float64).expand(z.shape)

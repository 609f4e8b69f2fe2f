"""Rules: which positions. An unmasking rule scores masked positions (highest first); the loop takes
each row's top-n by score among its candidates.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch


from registry import UNMASK_RULES


class UnmaskRule:
    """``scores(log_probs, tokens, z, generator)`` → (B, L) float; higher unmasks first. ``tokens``
    are drawn only at the candidates (masked, inside the step's window); elsewhere they equal ``z``,
    so only the candidates' scores are meaningful (the loop ignores the others)."""

    def scores(self, log_probs, tokens, z, generator: Optional[torch.Generator]) -> torch.Tensor:
        raise NotImplementedError


@UNMASK_RULES.register("random")
class RandomUnmask(UnmaskRule):
    """Uniformly random positions (MDLM ancestral sampling)."""

    def scores(self, log_probs, tokens, z, generator):
        return torch.rand(z.shape, generator=generator, dtype=torch.float64).to(z.device)


LAST = -1e6  # below any finite log-probability (p >= e^-1e6 underflows to 0), above select_top's -inf


@UNMASK_RULES.register("confidence")
class ConfidenceUnmask(UnmaskRule):
    """Highest probability of the drawn token first (LLaDA's low-confidence remasking).

    ``exclude`` (token ids; LLaDA's ``confidence_eos_eot_inf`` with EOS and end of turn): the confidence
    is the drawn token's probability under softmax(logits) with those tokens' logits at −inf, i.e.
    p(x) / (1 − Σ_{e ∈ exclude} p(e)), and a drawn excluded token has confidence 0: it unmasks after every
    other candidate (score ``LAST`` + its own log-probability, which orders the excluded among
    themselves). Only (B, L) values are computed."""

    def __init__(self, exclude: Sequence[int] = ()):
        self.exclude = tuple(int(e) for e in exclude)

    def scores(self, log_probs, tokens, z, generator):
        lp = log_probs.gather(-1, tokens[..., None]).squeeze(-1)
        if not self.exclude:
            return lp
        ids = torch.tensor(self.exclude, device=log_probs.device)
        mass = log_probs.index_select(-1, ids).double().exp().sum(-1)
        renorm = lp.double() - torch.log1p(-mass.clamp(max=1 - 1e-12))
        return torch.where(torch.isin(tokens, ids), LAST + lp.double(), renorm)


@UNMASK_RULES.register("margin")
class MarginUnmask(UnmaskRule):
    """Largest gap between the two most probable tokens first (Kim et al. 2025, top-2 margin)."""

    def scores(self, log_probs, tokens, z, generator):
        top2 = log_probs.topk(2, dim=-1).values.exp()  # exp is monotone: no (B, L, V) exp needed
        return top2[..., 0] - top2[..., 1]


@UNMASK_RULES.register("left_to_right")
class LeftToRightUnmask(UnmaskRule):
    """Leftmost masked positions first."""

    def scores(self, log_probs, tokens, z, generator):
        L = z.shape[1]
        return -torch.arange(L, device=z.device, dtype=torch.float64).expand(z.shape)

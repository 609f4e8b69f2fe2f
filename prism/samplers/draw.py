"""How tokens are drawn (the draw part of a sampler), only at the positions that may change:

    draws.categorical  the default: ``prism.ops.categorical_draw``, the inverse CDF in two levels
                       (two float64 uniforms per position; float32 probabilities, float64 sums over blocks)
    draws.gumbel       ``prism.ops.gumbel_max``: argmax of log p/τ + float32 Gumbel noise (one
                       uniform per position and token: the same law, slower on a CPU)

both with temperature τ and nucleus (top-p) filtering (reading 'within' | 'reach'), on the gathered (N, V) rows of the positions
drawn, with random numbers made on the logits' device. A draw part is called as
``draw(log_probs, generator, positions=..., fill=...)``: ``log_probs`` (B, L, V), ``positions``
(B, L) bool, the rows to draw (the loop passes its masked positions inside the step's window); the
other positions of the returned (B, L) tokens hold ``fill`` (the loop's current state).
"""
from __future__ import annotations

from typing import Optional

import torch

from prism.ops import NUCLEUS_READINGS, categorical_draw, gumbel_max
from registry import DRAWS


@DRAWS.register("categorical")
class CategoricalDraw:
    """``categorical_draw`` (x = min{v : Σ_{u ≤ v} p_u > U·Σ p}, p ∝ softmax(log p/τ) in the nucleus)
    with fixed temperature τ, nucleus p and its reading ``nucleus`` ('within', the default: the
    ReMDM / PRISM code's, while the running sum is ≤ p; 'reach': the smallest set reaching p, see
    ``prism.ops.nucleus_filter``); τ = 0 is greedy argmax. ``keep_probs``: after each call
    ``token_probs`` (B, L) float64 holds each drawn token's probability under the law it was drawn
    from (after the nucleus filter and renormalising), NaN where nothing was drawn."""

    function = staticmethod(categorical_draw)

    def __init__(self, temperature: float = 1.0, top_p: float = 1.0, nucleus: str = "within", keep_probs: bool = False):
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
        if nucleus not in NUCLEUS_READINGS:
            raise ValueError(f"unknown nucleus reading {nucleus!r}; known: {', '.join(NUCLEUS_READINGS)}")
        self.temperature, self.top_p, self.nucleus, self.keep_probs = temperature, top_p, nucleus, keep_probs
        self.token_probs: Optional[torch.Tensor] = None

    def __call__(self, log_probs: torch.Tensor, generator: Optional[torch.Generator] = None,
                 positions: Optional[torch.Tensor] = None, fill: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not self.keep_probs:
            return self.function(log_probs, generator, self.temperature, self.top_p, positions, fill, self.nucleus)
        tokens, self.token_probs = self.function(log_probs, generator, self.temperature, self.top_p, positions,
                                                 fill, self.nucleus, return_probs=True)
        return tokens


@DRAWS.register("gumbel")
class GumbelDraw(CategoricalDraw):
    """``gumbel_max`` (argmax of log p/τ + Gumbel noise after the nucleus filter) with fixed
    temperature τ and nucleus p (and its reading)."""

    function = staticmethod(gumbel_max)

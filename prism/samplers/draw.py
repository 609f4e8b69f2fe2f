"""How tokens are drawn (the draw part of a sampler), only at the positions that may change:

    draws.categorical  the default: ``prism.ops.categorical_draw``, the inverse CDF in two levels
                       (two float64 uniforms per position; float32 probabilities, float64 sums over blocks)
    draws.gumbel       ``prism.ops.gumbel_max``: argmax of log p/τ + float32 Gumbel noise (one
                       uniform per position and token: the same law, slower on a CPU)

both with temperature τ and nucleus (top-p) filtering, on the gathered (N, V) rows of the positions
drawn, with random numbers made on the logits' device. A draw part is called as
``draw(log_probs, generator, positions=..., fill=...)``: ``log_probs`` (B, L, V), ``positions``
(B, L) bool, the rows to draw (the loop passes its masked positions inside the step's window); the
other positions of the returned (B, L) tokens hold ``fill`` (the loop's current state).
"""
from __future__ import annotations

from typing import Optional

import torch

from prism.ops import categorical_draw, gumbel_max, nucleus_filter  # noqa: F401  (re-exported from prism.ops)
from registry import DRAWS


@DRAWS.register("categorical")
class CategoricalDraw:
    """``categorical_draw`` (x = min{v : Σ_{u ≤ v} p_u > U·Σ p}, p ∝ softmax(log p/τ) in the nucleus)
    with fixed temperature τ and nucleus p; τ = 0 is greedy argmax."""

    function = staticmethod(categorical_draw)

    def __init__(self, temperature: float = 1.0, top_p: float = 1.0):
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
        self.temperature, self.top_p = temperature, top_p

    def __call__(self, log_probs: torch.Tensor, generator: Optional[torch.Generator] = None,
                 positions: Optional[torch.Tensor] = None, fill: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.function(log_probs, generator, self.temperature, self.top_p, positions, fill)


@DRAWS.register("gumbel")
class GumbelDraw(CategoricalDraw):
    """``gumbel_max`` (argmax of log p/τ + Gumbel noise after the nucleus filter) with fixed
    temperature τ and nucleus p."""

    function = staticmethod(gumbel_max)

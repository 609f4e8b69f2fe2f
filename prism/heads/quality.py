"""Quality heads: ``heads.linear``, ``heads.attention``, ``heads.mlp``.

A head maps the backbone's final hidden states (B, L, D) to one logit per position (B, L); the
PRISM quality is g_i(y) = sigmoid(logit_i). It reads ``BackboneOutput.hidden_states``: for the DiT the
residual stream after the last block, before the final adaLN LayerNorm, i.e. the same state the
unmasking logits are computed from (for a transformers model, the last hidden state after its final
norm). Reading the state the unmasking layer reads is what makes the head cheap: the one backbone
pass that predicts the tokens also gives their quality, and a head that only re-weights that state
needs very few parameters (PRISM Table 3: ~133K on the 512-wide Sudoku DiT).

Heads are built by ``models.mdm`` from the backbone's sizes, so one gin line attaches any head to any
backbone: ``models.mdm.head = @heads.linear`` (no parentheses: the model calls it with
``hidden_size`` and ``cond_dim``). When the backbone has an adaLN conditioning vector (the DiT),
``linear`` and ``attention`` modulate their LayerNorm with it exactly as the DiT's final layer does.

The last linear map is zero-initialised: a fresh head says g = 0.5 everywhere and does not disturb
anything until it has been trained.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from prism.backbones.dit import DiTBlock, LayerNorm, Rotary, modulate
from registry import HEADS


class QualityHead(nn.Module):
    """``forward(hidden_states, cond=None, attention_mask=None)`` → (B, L) quality logits."""

    def forward(self, hidden_states: torch.Tensor, cond: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


def _zero_linear(d_in: int, d_out: int) -> nn.Linear:
    layer = nn.Linear(d_in, d_out)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class AdaLNOut(nn.Module):
    """LayerNorm (adaLN-modulated when ``cond_dim`` is set) + zero-initialised Linear(D, 1): the DiT's
    ``FinalLayer`` with one output instead of the vocabulary."""

    def __init__(self, hidden_size: int, cond_dim: Optional[int]):
        super().__init__()
        self.norm = LayerNorm(hidden_size)
        self.adaLN_modulation = _zero_linear(cond_dim, 2 * hidden_size) if cond_dim else None
        self.linear = _zero_linear(hidden_size, 1)

    def forward(self, h: torch.Tensor, cond: Optional[torch.Tensor]) -> torch.Tensor:
        h = self.norm(h)
        if self.adaLN_modulation is not None:
            if cond is None:
                raise ValueError("this head was built with cond_dim but the backbone gave no conditioning vector")
            shift, scale = self.adaLN_modulation(cond).chunk(2, dim=-1)
            h = modulate(h, shift, scale)
        return self.linear(h).squeeze(-1)


@HEADS.register("linear")
class LinearHead(QualityHead):
    """(adaLN) LayerNorm + Linear(D, 1): PRISM's Sudoku head. On the 512-wide DiT with cond_dim 128 it
    has 512 + 128·1024 + 1024 + 512 + 1 = 133,121 parameters."""

    def __init__(self, hidden_size: int, cond_dim: Optional[int] = None, adaln: bool = True):
        super().__init__()
        self.out = AdaLNOut(hidden_size, cond_dim if adaln else None)

    def forward(self, hidden_states, cond=None, attention_mask=None):
        return self.out(hidden_states, cond)


@HEADS.register("attention")
class AttentionHead(QualityHead):
    """One adaLN transformer block (the DiT's, with its own rotary embedding) on the final hidden
    state, then the linear head: PRISM's OWT head (about 7.9M parameters on the 768-wide DiT).
    Without a backbone conditioning vector the block's modulation is a learned constant."""

    def __init__(self, hidden_size: int, cond_dim: Optional[int] = None, n_heads: int = 12, mlp_ratio: int = 4):
        super().__init__()
        self.cond_dim = cond_dim or 1
        self.rotary = Rotary(hidden_size // n_heads)
        self.block = DiTBlock(hidden_size, n_heads, self.cond_dim, mlp_ratio)
        self.out = AdaLNOut(hidden_size, cond_dim)

    def forward(self, hidden_states, cond=None, attention_mask=None):
        B, L, _ = hidden_states.shape
        c = cond if cond is not None else hidden_states.new_zeros(B, self.cond_dim)
        bias = None
        if attention_mask is not None and not bool(attention_mask.all()):
            keep = attention_mask.bool()[:, None, None, :]
            bias = torch.zeros(keep.shape, dtype=hidden_states.dtype, device=hidden_states.device).masked_fill(
                ~keep, torch.finfo(hidden_states.dtype).min)
        h = self.block(hidden_states, c, self.rotary(L, hidden_states.device, hidden_states.dtype), bias)
        return self.out(h, cond)


@HEADS.register("mlp")
class MLPHead(QualityHead):
    """LayerNorm → Linear(D, D) → GELU → Linear(D, 1): PRISM's LLaDA head (no conditioning)."""

    def __init__(self, hidden_size: int, cond_dim: Optional[int] = None):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, hidden_size), nn.GELU(),
                                 _zero_linear(hidden_size, 1))

    def forward(self, hidden_states, cond=None, attention_mask=None):
        return self.net(hidden_states.to(self.net[1].weight.dtype)).squeeze(-1)

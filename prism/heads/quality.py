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

from typing import List, Optional

import torch
from torch import nn

from prism.backbones.kv_cache import key_padding_bias
from prism.layers import DiTBlock, LayerNorm, Rotary, modulate
from registry import HEADS


class QualityHead(nn.Module):
    """``forward(hidden_states, cond=None, attention_mask=None, cache=None, compute=None)`` → (B, n)
    quality logits for the n rows of ``hidden_states``. ``cache`` / ``compute``: the backbone's approximate
    KV cache (Fast-dLLM, ``prism.backbones.kv_cache``); on a partial pass ``hidden_states`` holds
    positions lo..hi-1 only and ``attention_mask`` is still the full (B, L). Per-token heads ignore both."""

    # a head that mixes positions must say how it serves a partial pass before it may claim this
    supports_kv_cache = False

    def forward(self, hidden_states: torch.Tensor, cond: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, cache=None,
                compute=None) -> torch.Tensor:  # pragma: no cover
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

    supports_kv_cache = True

    def __init__(self, hidden_size: int, cond_dim: Optional[int] = None, adaln: bool = True):
        super().__init__()
        self.out = AdaLNOut(hidden_size, cond_dim if adaln else None)

    def forward(self, hidden_states, cond=None, attention_mask=None, cache=None, compute=None):
        return self.out(hidden_states, cond)


def attention_head_choices(hidden_size: int) -> List[int]:
    """The head counts an attention head of width ``hidden_size`` can have: divisors of the width
    whose head dimension is even (the rotary embedding rotates pairs of channels)."""
    return [n for n in range(1, hidden_size + 1) if hidden_size % n == 0 and (hidden_size // n) % 2 == 0]


def default_attention_heads(hidden_size: int, max_heads: int = 12, min_head_dim: int = 32) -> int:
    """The largest valid head count ≤ ``max_heads`` whose head dimension is ≥ ``min_head_dim``; if
    none has (a width under 64), 1 head. On the DiT presets this is the backbone's own count
    (768 → 12, 512 → 8, 128 → 4), except ``test`` (32 wide, 2 heads) → 1 head of 32."""
    choices = attention_head_choices(hidden_size)
    if not choices:
        raise ValueError(f"heads.attention needs an even width (rotary embedding), got hidden_size {hidden_size}")
    wide = [n for n in choices if n <= max_heads and hidden_size // n >= min_head_dim]
    return max(wide) if wide else choices[0]


@HEADS.register("attention")
class AttentionHead(QualityHead):
    """One adaLN transformer block (the DiT's, with its own rotary embedding) on the final hidden
    state, then the linear head: PRISM's OWT head (about 7.9M parameters on the 768-wide DiT).
    Without a backbone conditioning vector the block's modulation is a learned constant.

    ``n_heads``: None (default) → ``default_attention_heads(hidden_size)``, derived from the width
    the model passes in (``models.mdm`` gives a head builder only the backbone's ``hidden_size`` and
    ``cond_dim``): at most 12 heads of at least 32 channels, e.g. 4 on the 128-wide ``cpu`` DiT. A
    given value must divide the width into an even head dimension, else a ValueError lists the valid
    choices."""

    supports_kv_cache = True

    def __init__(self, hidden_size: int, cond_dim: Optional[int] = None, n_heads: Optional[int] = None,
                 mlp_ratio: int = 4):
        super().__init__()
        if n_heads is None:
            n_heads = default_attention_heads(hidden_size)
        elif n_heads not in attention_head_choices(hidden_size):
            raise ValueError(
                f"heads.attention.n_heads = {n_heads} does not split the backbone width {hidden_size} into "
                f"equal even-sized heads; valid choices: {attention_head_choices(hidden_size)} "
                "(or leave n_heads unset to derive it from the width)"
            )
        self.n_heads = n_heads
        self.cond_dim = cond_dim or 1
        self.rotary = Rotary(hidden_size // n_heads)
        self.block = DiTBlock(hidden_size, n_heads, self.cond_dim, mlp_ratio)
        self.out = AdaLNOut(hidden_size, cond_dim)

    def forward(self, hidden_states, cond=None, attention_mask=None, cache=None, compute=None):
        """With ``cache``, the block's keys and values go in it under the layer name ``"head"``; with
        ``compute=(lo, hi)`` the rows are positions lo..hi-1 and attend over all cached positions."""
        B, n, _ = hidden_states.shape
        if compute is None:
            lo, L = 0, n
        else:
            if cache is None or "head" not in cache.layers:
                raise ValueError("heads.attention: compute= needs a KV cache filled by a refresh pass")
            lo, L = int(compute[0]), cache.layers["head"][0].shape[2]
        c = cond if cond is not None else hidden_states.new_zeros(B, self.cond_dim)
        bias = key_padding_bias(attention_mask, hidden_states.dtype, hidden_states.device)
        cos, sin = self.rotary(L, hidden_states.device, hidden_states.dtype)
        kv = None if cache is None else cache.bind("head", compute)
        h = self.block(hidden_states, c, (cos[lo:lo + n], sin[lo:lo + n]), bias, kv)
        return self.out(h, cond)


@HEADS.register("mlp")
class MLPHead(QualityHead):
    """LayerNorm → Linear(D, D) → GELU → Linear(D, 1): PRISM's LLaDA head (no conditioning)."""

    supports_kv_cache = True

    def __init__(self, hidden_size: int, cond_dim: Optional[int] = None):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, hidden_size), nn.GELU(),
                                 _zero_linear(hidden_size, 1))

    def forward(self, hidden_states, cond=None, attention_mask=None, cache=None, compute=None):
        return self.net(hidden_states.to(self.net[1].weight.dtype)).squeeze(-1)

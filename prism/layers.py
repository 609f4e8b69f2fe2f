"""Transformer building blocks shared by backbones and heads: MDLM's weight-only LayerNorm, adaLN
modulation, rotary position embeddings (RoFormer) and the adaLN-zero DiT block (Peebles & Xie 2023, as
MDLM uses it). Attention runs on torch SDPA; flash-attn only when it is installed and the tensors are
on CUDA in half precision."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

try:  # optional CUDA path
    import flash_attn  # type: ignore
except Exception:  # pragma: no cover - flash-attn cannot be installed without CUDA
    flash_attn = None

class LayerNorm(nn.Module):
    """Weight-only LayerNorm (no bias), computed in float32 as MDLM does."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), (self.dim,)).to(x.dtype) * self.weight


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class Rotary(nn.Module):
    """Rotary position embedding (RoFormer), base 10000, applied to queries and keys."""

    def __init__(self, head_dim: int, base: float = 10_000.0):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, length: int, device, dtype):
        t = torch.arange(length, device=device, dtype=self.inv_freq.dtype)
        freqs = torch.outer(t, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, L, D); cos/sin: (L, D)."""
    return x * cos + _rotate_half(x) * sin


class DiTBlock(nn.Module):
    """One adaLN-zero transformer block: x + gate·Attn(mod(LN(x))), then x + gate·MLP(mod(LN(x)))."""

    def __init__(self, dim: int, n_heads: int, cond_dim: int, mlp_ratio: int = 4, dropout: float = 0.0):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"hidden_size {dim} is not divisible by n_heads {n_heads}")
        self.n_heads = n_heads
        self.norm1 = LayerNorm(dim)
        self.attn_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_out = nn.Linear(dim, dim, bias=False)
        self.norm2 = LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim), nn.GELU(approximate="tanh"), nn.Linear(mlp_ratio * dim, dim)
        )
        self.dropout = dropout
        self.adaLN_modulation = nn.Linear(cond_dim, 6 * dim)
        nn.init.zeros_(self.adaLN_modulation.weight)
        nn.init.zeros_(self.adaLN_modulation.bias)

    def attention(self, x, rotary, attn_bias, kv=None):
        """``kv``: optional hook ``(k, v) -> (k, v)`` (``KVCache.bind``) that stores this layer's keys and
        values, or writes them into a cache and returns the cached ones for all L positions (Fast-dLLM)."""
        B, L, D = x.shape
        qkv = self.attn_qkv(x).view(B, L, 3, self.n_heads, D // self.n_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, L, Dh)
        cos, sin = rotary
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv is not None:
            k, v = kv(k, v)  # on a partial pass: the keys of every position, the queries stay L rows
        if flash_attn is not None and x.is_cuda and attn_bias is None and x.dtype in (torch.float16, torch.bfloat16):
            out = flash_attn.flash_attn_func(  # pragma: no cover - CUDA only
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                dropout_p=self.dropout if self.training else 0.0,
            ).reshape(B, L, D)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_bias, dropout_p=self.dropout if self.training else 0.0
            ).transpose(1, 2).reshape(B, L, D)
        return self.attn_out(out)

    def forward(self, x, c, rotary, attn_bias=None, kv=None):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        h = self.attention(modulate(self.norm1(x), shift_msa, scale_msa), rotary, attn_bias, kv)
        x = x + gate_msa[:, None] * F.dropout(h, self.dropout, self.training)
        h = self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x + gate_mlp[:, None] * F.dropout(h, self.dropout, self.training)

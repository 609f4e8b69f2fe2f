"""``backbones.dit``: MDLM's diffusion transformer (Sahoo et al. 2024, ``models/dit.py``).

adaLN-zero blocks, rotary position embeddings, weight-only LayerNorm, GELU-tanh MLP, and a timestep
embedder whose output is zero when time conditioning is off (MDLM's default for OWT and PRISM's for
Sudoku: the parameters exist and are counted, the input sigma is 0). Attention runs on torch SDPA;
flash-attn is used only when it is installed and the tensors are on CUDA.

Optional ``position_groups``: a LongTensor (n_groups, L) of group ids per position, each row adding a
learned embedding table (e.g. Sudoku's row / column / 3x3 box ids from
``tasks.sudoku_position_groups``); with ``group_attention`` a position attends only to positions that
share a group with it.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from prism.backbones.base import Backbone, BackboneOutput
from prism.backbones.kv_cache import cache_ranges, key_padding_bias
from prism.layers import DiTBlock, LayerNorm, Rotary, modulate  # noqa: F401  (DiTBlock: FSDP wraps it by name)
from registry import BACKBONES, closest_names

PRESETS = {
    # MDLM / PRISM Sudoku model: 28,558,091 parameters at vocab 11.
    "tiny": dict(hidden_size=512, n_blocks=8, n_heads=8, cond_dim=128),
    # MDLM OWT model: 169.6M parameters at vocab 50258.
    "small": dict(hidden_size=768, n_blocks=12, n_heads=12, cond_dim=128),
    # CPU-sized: trains in minutes to hours on 2 cores (the shipped Sudoku checkpoint).
    "cpu": dict(hidden_size=128, n_blocks=6, n_heads=4, cond_dim=64),
    # For tests.
    "test": dict(hidden_size=32, n_blocks=2, n_heads=2, cond_dim=16),
}


class TimestepEmbedder(nn.Module):
    """Sinusoidal frequency embedding of sigma, then a 2-layer SiLU MLP (DiT / MDLM)."""

    def __init__(self, cond_dim: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim)
        )

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        half = self.frequency_size // 2
        freqs = torch.exp(
            -math.log(10_000) * torch.arange(half, device=sigma.device, dtype=torch.float32) / half
        )
        args = sigma.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb)


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and a zero-initialised linear map to the vocabulary."""

    def __init__(self, dim: int, vocab_size: int, cond_dim: int):
        super().__init__()
        self.norm_final = LayerNorm(dim)
        self.linear = nn.Linear(dim, vocab_size)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.adaLN_modulation = nn.Linear(cond_dim, 2 * dim)
        nn.init.zeros_(self.adaLN_modulation.weight)
        nn.init.zeros_(self.adaLN_modulation.bias)

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


@BACKBONES.register("dit")
class DiT(Backbone):
    """MDLM's DiT as an MDM backbone. ``preset`` ('tiny', 'small', 'cpu', 'test') fills the sizes;
    explicit arguments override it.

    ``hidden_states`` in the output is the residual stream after the last block (before the final
    adaLN LayerNorm), the state the final layer maps to logits.

    ``gradient_checkpointing``: keep only each block's input while training and recompute the block in
    backward (non-reentrant, dropout replayed). PRISM's OWT step (n_y = 4 sequences y per z) at batch
    2 × L 1024 peaked at 17.5 GB on the CPU without it, 12.5 GB with it (``benchmarks/full_size.py``).
    """

    released_names = ("", "backbone.")  # MDLM's Hub model holds its DiT as .backbone

    def __init__(
        self,
        vocab_size: int,
        mask_id: int,
        preset: Optional[str] = None,
        hidden_size: Optional[int] = None,
        n_blocks: Optional[int] = None,
        n_heads: Optional[int] = None,
        cond_dim: Optional[int] = None,
        mlp_ratio: int = 4,
        dropout: float = 0.0,
        time_conditioning: bool = False,
        position_groups: Optional[torch.Tensor] = None,
        group_attention: bool = False,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        self.gradient_checkpointing = gradient_checkpointing
        sizes = dict(hidden_size=hidden_size, n_blocks=n_blocks, n_heads=n_heads, cond_dim=cond_dim)
        if preset is not None:
            if preset not in PRESETS:
                close = closest_names(preset, list(PRESETS))
                hint = f" Did you mean '{close[0]}'?" if close else ""
                raise ValueError(f"Unknown DiT preset '{preset}'.{hint} Known presets: {', '.join(PRESETS)}")
            sizes = {k: (v if v is not None else PRESETS[preset][k]) for k, v in sizes.items()}
        missing = [k for k, v in sizes.items() if v is None]
        if missing:
            raise ValueError(f"backbones.dit needs {missing} (or a preset: {', '.join(PRESETS)})")
        if not 0 <= mask_id < vocab_size:
            raise ValueError(f"mask_id {mask_id} is outside the vocabulary [0, {vocab_size})")
        self.vocab_size, self.mask_id, self.hidden_size = vocab_size, mask_id, sizes["hidden_size"]
        self.time_conditioning = time_conditioning
        dim, cond = sizes["hidden_size"], sizes["cond_dim"]
        self.cond_dim = cond

        self.vocab_embed = nn.Parameter(torch.empty(vocab_size, dim))
        nn.init.kaiming_uniform_(self.vocab_embed, a=math.sqrt(5))
        self.sigma_map = TimestepEmbedder(cond)
        self.rotary = Rotary(dim // sizes["n_heads"])
        self.blocks = nn.ModuleList(
            DiTBlock(dim, sizes["n_heads"], cond, mlp_ratio, dropout) for _ in range(sizes["n_blocks"])
        )
        self.output_layer = FinalLayer(dim, vocab_size, cond)

        if position_groups is not None:
            groups = torch.as_tensor(position_groups, dtype=torch.long)
            if groups.dim() == 1:
                groups = groups[None]
            self.register_buffer("position_groups", groups, persistent=False)
            self.group_embed = nn.ModuleList(
                nn.Embedding(int(g.max()) + 1, dim) for g in groups
            )
            for emb in self.group_embed:
                nn.init.normal_(emb.weight, std=0.02)
        else:
            self.position_groups = None
        if group_attention:
            if position_groups is None:
                raise ValueError("backbones.dit.group_attention needs position_groups")
            # A position attends only to positions sharing a group with it (for Sudoku: its row,
            # column and box peers: the constraint graph), an optional inductive bias.
            share = (self.position_groups[:, :, None] == self.position_groups[:, None, :]).any(0)
            bias = torch.zeros(share.shape).masked_fill(~share, float("-inf"))
            self.register_buffer("group_bias", bias, persistent=False)
        else:
            self.group_bias = None

    skips_logits = True
    supports_kv_cache = True

    def forward(self, input_ids, attention_mask=None, t=None, logits: bool = True, cache=None, compute=None,
                keep=None) -> BackboneOutput:
        """``cache`` / ``compute`` / ``keep``: the approximate KV cache (Fast-dLLM, ``Backbone``'s docstring):
        a partial pass embeds positions lo..hi-1 only, with their rotary angles, group embeddings and
        ``group_bias`` rows, and attends over every cached key."""
        B, L = input_ids.shape
        lo, hi, a, b = cache_ranges(cache, compute, keep, L)
        x = self.vocab_embed[input_ids[:, lo:hi]]
        if self.position_groups is not None:
            if self.position_groups.shape[1] != L:
                raise ValueError(
                    f"position_groups cover {self.position_groups.shape[1]} positions, input has {L}"
                )
            for groups, emb in zip(self.position_groups, self.group_embed):
                x = x + emb(groups[lo:hi])[None]
        if self.time_conditioning and t is not None:
            # MDLM conditions on the total noise σ(t) = −log(1 − (1 − 1e-3)·t) of the log-linear schedule
            sigma = -torch.log1p(-(1 - 1e-3) * t.float())
        else:
            sigma = torch.zeros(B, device=x.device)
        c = F.silu(self.sigma_map(sigma)).to(x.dtype)
        cos, sin = self.rotary(L, x.device, x.dtype)
        rotary = (cos[lo:hi], sin[lo:hi])
        attn_bias = None if self.group_bias is None else self.group_bias[lo:hi].to(x.dtype)
        # Additive float mask over keys: padding keys get a dtype-min bias so no token attends to them.
        pad = key_padding_bias(attention_mask, x.dtype, x.device)
        if pad is not None:
            attn_bias = pad if attn_bias is None else attn_bias + pad
        ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled() and cache is None
        for i, block in enumerate(self.blocks):
            if ckpt:
                x = checkpoint(block, x, c, rotary, attn_bias, None, use_reentrant=False)
            else:
                x = block(x, c, rotary, attn_bias, None if cache is None else cache.bind(f"blocks.{i}", compute))
        # a quality-only pass (PRISM's on y) skips the (B, L, V) output layer; ``keep`` runs it on a block only
        out = self.output_layer(x[:, a - lo:b - lo], c) if logits else None
        return BackboneOutput(hidden_states=x, logits=out, cond=c)

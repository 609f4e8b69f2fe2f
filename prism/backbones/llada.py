"""``backbones.llada``: LLaDA-8B (Nie et al. 2025) in plain PyTorch, reading the released checkpoint as is.

The architecture is a Llama-style transformer *encoder*: RMSNorm (float32, eps from the config), rotary
position embeddings (rotate-half convention, θ = ``rope_theta``, applied in float32 as the released
``rope_full_precision`` does), bidirectional multi-head attention, a SwiGLU MLP
``ff_out(silu(ff_proj(x)) * up_proj(x))``, no biases, untied input embedding and output layer.

Parameter names are the released ones (``model.transformer.wte.weight``,
``model.transformer.blocks.N.{attn_norm,q_proj,k_proj,v_proj,attn_out,ff_norm,ff_proj,up_proj,ff_out}.weight``,
``model.transformer.ln_f.weight``, ``model.transformer.ff_out.weight``), so the backbone's own
``state_dict`` is the checkpoint's. Rotary tables are computed on the fly (no buffers).

Unlike the released modeling code, padding is honoured: keys where ``attention_mask`` is False are never
attended to and rotary positions count only real tokens (``cumsum(mask) - 1``), so a left- or
right-padded row gives the logits of the unpadded sequence.

``hidden_states`` is the final hidden state after ``ln_f`` (what ``ff_out`` reads; the released
``hidden_states[-1]``), ``logits`` is ``ff_out`` of it.

Pretrained weights: a local directory (config.json + ``model.safetensors`` or sharded
``model-*.safetensors`` with ``model.safetensors.index.json``) or a hub id (``snapshot_download``).
The module is built on the meta device and filled shard by shard, each tensor cast to ``dtype`` as it is
read, so the model never exists twice nor in float32 when ``dtype`` is bfloat16.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn
from torch.utils.checkpoint import checkpoint

from prism.backbones.base import Backbone, BackboneOutput
from prism.backbones.kv_cache import cache_ranges, key_padding_bias
from prism.backbones.llada_files import REVISION, checkpoint_files, resolve_model_dir
from prism.backbones.upcast_linear import UpcastLinear
from prism.checkpoint import as_dtype
from prism.safetensors_stream import iter_tensors
from registry import BACKBONES, closest_names

try:  # optional CUDA path
    from flash_attn import flash_attn_func  # type: ignore
except Exception:  # pragma: no cover - flash-attn cannot be installed without CUDA
    flash_attn_func = None


# LLaDA-8B's special tokens (generation_config / tokenizer): also used for a checkpoint of that vocabulary
# whose config.json does not name them.
LLADA_IDS = dict(bos_token_id=126080, eos_token_id=126081, pad_token_id=126081, eot_token_id=126348,
                 mask_token_id=126336)

LLADA_IDS_VOCAB = 126464  # embedding rows of the released model

PRESETS: Dict[str, Dict[str, Any]] = {
    "8b": dict(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, mlp_hidden_size=12288, vocab_size=126464,
               embedding_size=126464, max_sequence_length=4096, rms_norm_eps=1e-5, rope_theta=500000.0,
               **LLADA_IDS),
    # random, for tests: vocab_size / mask_token_id overridable through ``config`` / ``mask_id``
    "tiny": dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, mlp_hidden_size=128, vocab_size=128,
                 max_sequence_length=512, rms_norm_eps=1e-5, rope_theta=500000.0),
}

# config.json keys whose value this implementation requires (released values); absent keys are fine.
REQUIRED_VALUES = dict(include_bias=False, include_qkv_bias=False, weight_tying=False, rope=True, alibi=False,
                       block_type="llama", layer_norm_type="rms", activation_type="silu", input_emb_norm=False,
                       scale_logits=False, attention_layer_norm=False, clip_qkv=None, block_group_size=1,
                       multi_query_attention=False)
SIZE_KEYS = ("d_model", "n_layers", "n_heads", "mlp_hidden_size", "vocab_size")


def resolve_config(preset: Optional[str] = None, base: Optional[Dict[str, Any]] = None,
                   overrides: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Preset, then ``base`` (a checkpoint's config.json), then ``overrides``; checked and completed
    (``n_kv_heads``, ``embedding_size``, ``mlp_hidden_size``, ``rope_theta``, ``rms_norm_eps``)."""
    cfg: Dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            close = closest_names(preset, list(PRESETS))
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ValueError(f"Unknown LLaDA preset '{preset}'.{hint} Known presets: {', '.join(PRESETS)}")
        cfg.update(PRESETS[preset])
    cfg.update(base or {})
    cfg.update(overrides or {})
    if cfg.get("mlp_hidden_size") is None and cfg.get("mlp_ratio") and cfg.get("d_model"):
        cfg["mlp_hidden_size"] = cfg["mlp_ratio"] * cfg["d_model"]
    missing = [k for k in SIZE_KEYS if cfg.get(k) is None]
    if missing:
        raise ValueError(f"backbones.llada needs {missing} (give a preset: {', '.join(PRESETS)}, a checkpoint "
                         "directory with config.json, or backbones.llada.config)")
    for key, want in REQUIRED_VALUES.items():
        # null means the modeling code's default (the released config.json has "multi_query_attention": null)
        if cfg.get(key) is not None and cfg[key] != want:
            raise ValueError(f"backbones.llada supports only {key}={want!r} (the released LLaDA-8B architecture); "
                             f"the config has {key}={cfg[key]!r}")
    cfg["n_kv_heads"] = cfg.get("n_kv_heads") or cfg["n_heads"]
    cfg["embedding_size"] = cfg.get("embedding_size") or cfg["vocab_size"]
    cfg.setdefault("rope_theta", 10000.0)  # the released modeling code's default when config.json has none
    cfg.setdefault("rms_norm_eps", 1e-5)
    d, h, kv = cfg["d_model"], cfg["n_heads"], cfg["n_kv_heads"]
    if d % h or h % kv or (d // h) % 2:
        raise ValueError(f"backbones.llada: d_model {d} must split into n_heads {h} heads of even size, "
                         f"and n_heads into n_kv_heads {kv} groups")
    if cfg["embedding_size"] < cfg["vocab_size"]:
        raise ValueError(f"embedding_size {cfg['embedding_size']} is smaller than vocab_size {cfg['vocab_size']}")
    if cfg["embedding_size"] == LLADA_IDS_VOCAB:
        for key, value in LLADA_IDS.items():
            cfg.setdefault(key, value)
    return cfg


class RMSNorm(nn.Module):
    """x / rms(x) in float32, cast back, times the weight (no bias)."""

    def __init__(self, dim: int, eps: float, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    return (xf * cos + _rotate_half(xf) * sin).to(x.dtype)


class LLaDABlock(nn.Module):
    """Pre-norm Llama block: x + attn_out(Attn(attn_norm(x))), then x + ff_out(silu(ff_proj) * up_proj)."""

    def __init__(self, cfg: Dict[str, Any], dtype=None, attn_implementation: str = "sdpa", matmul: str = "auto"):
        super().__init__()
        d, h, kv, hidden = cfg["d_model"], cfg["n_heads"], cfg["n_kv_heads"], cfg["mlp_hidden_size"]
        self.n_heads, self.n_kv_heads, self.head_dim = h, kv, d // h
        self.attn_implementation = attn_implementation
        lin = lambda i, o: UpcastLinear(i, o, bias=False, dtype=dtype, matmul=matmul)  # noqa: E731
        self.attn_norm = RMSNorm(d, cfg["rms_norm_eps"], dtype)
        self.q_proj, self.k_proj, self.v_proj = lin(d, d), lin(d, kv * self.head_dim), lin(d, kv * self.head_dim)
        self.attn_out = lin(d, d)
        self.ff_norm = RMSNorm(d, cfg["rms_norm_eps"], dtype)
        self.ff_proj, self.up_proj, self.ff_out = lin(d, hidden), lin(d, hidden), lin(hidden, d)

    def attention(self, x, cos, sin, bias, kv=None):
        B, L, D = x.shape
        q = self.q_proj(x).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        if kv is not None:  # Fast-dLLM cache (``KVCache.bind``): store, or write and read back all L keys
            k, v = kv(k, v)
        if (self.attn_implementation == "flash_attn" and flash_attn_func is not None and bias is None and x.is_cuda
                and x.dtype in (torch.float16, torch.bfloat16)):  # pragma: no cover - CUDA only
            out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=False)
            return self.attn_out(out.reshape(B, L, D))
        if self.n_kv_heads != self.n_heads:
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if self.attn_implementation == "eager":
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)
            if bias is not None:
                scores = scores + bias
            out = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype) @ v
        else:
            # under autocast q may be bf16 while the mask was built in the weights' dtype
            mask = None if bias is None else bias.to(q.dtype)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False)
        return self.attn_out(out.transpose(1, 2).reshape(B, L, D))

    def forward(self, x, cos, sin, bias=None, kv=None):
        x = x + self.attention(self.attn_norm(x), cos, sin, bias, kv)
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))


@BACKBONES.register("llada")
class LLaDABackbone(Backbone):
    """LLaDA as an MDM backbone.

    - ``model_name_or_path``: a local directory (config.json + safetensors, single or sharded with
      ``model.safetensors.index.json``) or a hub id such as ``'GSAI-ML/LLaDA-8B-Instruct'`` (downloaded with
      ``huggingface_hub.snapshot_download`` at ``revision``). None: random weights (normal, std 0.02).
    - ``revision``: the hub commit to pin (default ``REVISION``, None: no pin; see its comment).
    - ``preset``: ``'8b'`` or ``'tiny'``; sizes for a random model (a checkpoint's config.json wins over it).
    - ``config``: dict of config.json-style overrides (``d_model``, ``n_layers``, ``vocab_size``, ...).
    - ``dtype``: parameter dtype; default ``'bfloat16'`` for pretrained weights, ``'float32'`` for random.
    - ``mask_id``: override of the config's ``mask_token_id`` (default for configs without one: last id).
    - ``gradient_checkpointing``: recompute each block in backward (only while training).
    - ``attn_implementation``: ``'sdpa'`` (default), ``'eager'`` or ``'flash_attn'`` (used on CUDA in half
      precision without padding when flash-attn is installed; SDPA otherwise).
    - ``device``: where the weights go (loaded straight there; ``'meta'`` builds shapes only).
    - ``matmul``: 'auto' | 'upcast' | 'native': how bf16 Linears multiply on a CPU without bf16 units
      (``prism.backbones.upcast_linear``: the same product with float32 accumulation, several times faster
      there; 'auto' upcasts only on such CPUs).
    """

    def __init__(self, model_name_or_path: Optional[str] = None, revision: Optional[str] = REVISION,
                 preset: Optional[str] = None, config: Optional[Dict[str, Any]] = None, dtype: Optional[str] = None,
                 mask_id: Optional[int] = None, gradient_checkpointing: bool = False,
                 attn_implementation: str = "sdpa", device: Optional[str] = None, matmul: str = "auto"):
        super().__init__()
        if attn_implementation not in ("sdpa", "eager", "flash_attn"):
            raise ValueError(f"backbones.llada.attn_implementation must be 'sdpa', 'eager' or 'flash_attn', "
                             f"got {attn_implementation!r}")
        directory = None
        if model_name_or_path is not None:
            directory = resolve_model_dir(model_name_or_path, revision)
            with open(os.path.join(directory, "config.json")) as f:
                base = json.load(f)
        elif preset is None and not config:
            raise ValueError("backbones.llada needs model_name_or_path (e.g. 'GSAI-ML/LLaDA-8B-Instruct'), "
                             f"a preset ({', '.join(PRESETS)}) or a config")
        else:
            base = None
        cfg = resolve_config(preset, base, config)
        if mask_id is not None:
            cfg["mask_token_id"] = mask_id
        cfg.setdefault("mask_token_id", cfg["vocab_size"] - 1)
        torch_dtype = as_dtype(dtype or ("bfloat16" if directory is not None else "float32"))
        self.config = cfg
        self.vocab_size, self.hidden_size = cfg["embedding_size"], cfg["d_model"]
        self.mask_id = int(cfg["mask_token_id"])
        if not 0 <= self.mask_id < self.vocab_size:
            raise ValueError(f"mask_id {self.mask_id} is outside the vocabulary [0, {self.vocab_size})")
        self.eos_id, self.pad_id = cfg.get("eos_token_id"), cfg.get("pad_token_id")
        self.bos_id, self.eot_id = cfg.get("bos_token_id"), cfg.get("eot_token_id")
        self.gradient_checkpointing = gradient_checkpointing
        self.attn_implementation = attn_implementation

        build_device = torch.device("meta") if directory is not None else torch.device(device or "cpu")
        with build_device:
            self.model = nn.Module()
            self.model.transformer = nn.ModuleDict(dict(
                wte=nn.Embedding(cfg["embedding_size"], cfg["d_model"], dtype=torch_dtype),
                blocks=nn.ModuleList(LLaDABlock(cfg, torch_dtype, attn_implementation, matmul)
                                     for _ in range(cfg["n_layers"])),
                ln_f=RMSNorm(cfg["d_model"], cfg["rms_norm_eps"], torch_dtype),
                ff_out=UpcastLinear(cfg["d_model"], cfg["embedding_size"], bias=False, dtype=torch_dtype,
                                    matmul=matmul),
            ))
        if directory is not None:
            self.load_released(directory, torch_dtype, device or "cpu")
        elif build_device.type != "meta":
            with torch.no_grad():
                for name, p in self.named_parameters():
                    if p.dim() == 1:  # RMSNorm weights
                        p.fill_(1.0)
                    else:
                        p.normal_(0.0, 0.02)

    # ---------------------------------------------------------------------------------------- loading
    @torch.no_grad()
    def load_released(self, directory: str, dtype: torch.dtype, device="cpu") -> None:
        """Fill the meta-built module from ``directory``'s safetensors, one shard at a time, each tensor
        read (cast to ``dtype``) into a fresh tensor that replaces its meta parameter: the peak is the
        model's bytes plus one staging buffer (``prism.safetensors_stream``). Missing, unexpected and
        mis-shaped names are an error before anything is read."""
        files = checkpoint_files(directory)
        own = {n: tuple(t.shape) for n, t in self.state_dict().items()}
        found: Dict[str, tuple] = {}
        for file in files:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    found[key] = tuple(f.get_slice(key).get_shape())
        missing = sorted(set(own) - set(found))
        unexpected = sorted(set(found) - set(own))
        shapes = sorted(f"{n}: checkpoint {found[n]} vs model {own[n]}" for n in own if n in found and found[n] != own[n])
        if missing or unexpected or shapes:
            show = lambda names: f"{names[:6]}" + (f" (+{len(names) - 6} more)" if len(names) > 6 else "")  # noqa: E731
            raise ValueError(f"LLaDA checkpoint {directory} does not match its config: missing {len(missing)} "
                             f"{show(missing)}; unexpected {len(unexpected)} {show(unexpected)}; shape mismatches "
                             f"{len(shapes)} {show(shapes)}")
        device = torch.device(device)
        for file in files:
            # read straight into each parameter's final storage (no memory map, no second copy)
            fill = iter_tensors(file, lambda key, shape, _: torch.empty(shape, dtype=dtype))
            shard = {key: t.to(device) for key, t in fill}
            self.load_state_dict(shard, strict=False, assign=True)
            del shard
        still_meta = [n for n, p in self.named_parameters() if p.is_meta]
        if still_meta:  # pragma: no cover - excluded by the check above
            raise ValueError(f"LLaDA checkpoint {directory} left parameters unloaded: {still_meta[:6]}")

    # ---------------------------------------------------------------------------------------- forward
    def rotary(self, positions: torch.Tensor):
        """cos, sin (float32) for positions (L,) or (B, L), shaped to broadcast over (B, H, L, head_dim)."""
        hd = self.hidden_size // self.config["n_heads"]
        inv_freq = 1.0 / (self.config["rope_theta"] ** (
            torch.arange(0, hd, 2, device=positions.device, dtype=torch.float32) / hd))
        freqs = positions.float()[..., None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        emb = emb[None, None] if positions.dim() == 1 else emb[:, None]
        return emb.cos(), emb.sin()

    skips_logits = True  # forward(..., logits=False): the final hidden state only (``MDM`` asks for it)
    supports_kv_cache = True

    def forward(self, input_ids, attention_mask=None, t=None, logits: bool = True, cache=None, compute=None,
                keep=None) -> BackboneOutput:
        """``logits=False`` skips the output layer: a quality-only pass (PRISM's on y) saves a (B, L, V) tensor.
        ``cache`` / ``compute`` / ``keep``: Fast-dLLM's KV cache (``Backbone``); positions from the full mask."""
        tr = self.model.transformer
        B, L = input_ids.shape
        lo, hi, a, b = cache_ranges(cache, compute, keep, L)
        x = tr.wte(input_ids[:, lo:hi])
        bias = key_padding_bias(attention_mask, x.dtype, x.device)
        if bias is not None:
            positions = (attention_mask.bool().to(x.device).long().cumsum(-1) - 1).clamp(min=0)[:, lo:hi]
        else:
            positions = torch.arange(lo, hi, device=input_ids.device)
        cos, sin = self.rotary(positions)
        ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled() and cache is None
        for i, block in enumerate(tr.blocks):
            kv = None if cache is None else cache.bind(f"blocks.{i}", compute)
            x = checkpoint(block, x, cos, sin, bias, use_reentrant=False) if ckpt else block(x, cos, sin, bias, kv)
        h = tr.ln_f(x)
        return BackboneOutput(hidden_states=h, logits=tr.ff_out(h[:, a - lo:b - lo]) if logits else None)


def parameter_count(preset: Optional[str] = "8b", config: Optional[Dict[str, Any]] = None) -> int:
    """Number of parameters of a preset / config, from a build on the meta device (no memory)."""
    return sum(p.numel() for p in LLaDABackbone(preset=preset, config=config, device="meta").parameters())

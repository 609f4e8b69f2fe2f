"""A Linear layer whose half-precision matmuls run in float32 on CPUs that have no half-precision units.

A bf16 GEMM (oneDNN) multiplies bf16 inputs with float32 accumulation and rounds the output to bf16.
On a CPU with AMX or AVX512-BF16 that is fast; on one without (AVX-512 only), oneDNN emulates it and
runs at a fraction of its float32 speed (measured on a 2-core Xeon without those units: ~56 vs ~260
GFLOP/s; the load phase of ``benchmarks/full_size.py`` prints the check). ``UpcastLinear`` computes the *same*
product there: the input rounded to the compute dtype exactly as autocast / a bf16 model would, then
both operands widened to float32 (exact) in slices of at most ``CHUNK_ELEMENTS`` weight elements,
float32 accumulation, the output rounded back. Only the order of the float32 sums differs from the
native kernel. The weight stays in half precision; no float32 copy of it outlives one slice, and the
backward recomputes the widened slices instead of saving them.

``matmul``: 'auto' (upcast exactly when the compute dtype is bf16/fp16, the weight is on the CPU and
the CPU lacks bf16 units), 'upcast' (always in that case, for tests), 'native' (never).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import nn

# 16 MB of float32 weight at a time: a slice stays in cache between its widening and its product (measured on
# 2 cores, (256 × 4096) · (4096 × 12288): 4M-element slices 173-181 GFLOP/s, 64M-element slices 127)
CHUNK_ELEMENTS = 4 * 2**20
HALF = (torch.bfloat16, torch.float16)
MODES = ("auto", "upcast", "native")


@functools.lru_cache(maxsize=1)
def cpu_has_half_matmul() -> bool:
    """True when the CPU advertises bf16 matrix units (AMX-BF16 or AVX512-BF16; Linux /proc/cpuinfo).
    Elsewhere (no /proc/cpuinfo: macOS, Windows) the native kernels are trusted."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:
        return True
    if flags is None:
        return True
    return "amx_bf16" in flags or "avx512_bf16" in flags


def _rows(weight: torch.Tensor) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, weight.shape[1]))


class _UpcastMatmul(torch.autograd.Function):
    """y = x W^T (+ b) with x, W already in the compute dtype, accumulated in float32 slice by slice."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        rows, xf = _rows(weight), x.float()
        out = torch.empty(*x.shape[:-1], weight.shape[0], dtype=x.dtype, device=x.device)
        for lo in range(0, weight.shape[0], rows):
            w = weight[lo:lo + rows].float()
            y = xf @ w.T
            if bias is not None:
                y += bias[lo:lo + rows].float()
            out[..., lo:lo + rows] = y
        ctx.save_for_backward(x if weight.requires_grad else None, weight)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        rows, gf = _rows(weight), grad.float()
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            acc = None
            for lo in range(0, weight.shape[0], rows):
                part = gf[..., lo:lo + rows] @ weight[lo:lo + rows].float()
                acc = part if acc is None else acc.add_(part)
            gx = acc.to(grad.dtype)
        if ctx.needs_input_grad[1]:
            g2, x2 = gf.reshape(-1, gf.shape[-1]), x.float().reshape(-1, x.shape[-1])
            gw = (g2.T @ x2).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = gf.reshape(-1, gf.shape[-1]).sum(0)
        return gx, gw, gb


def compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype a native call would multiply in: the CPU autocast dtype when autocast is on, else the
    weight's (None when a native call would refuse the mix, so that it raises its own error)."""
    if torch.is_autocast_enabled("cpu") and x.device.type == "cpu":
        return torch.get_autocast_dtype("cpu")
    return weight.dtype if x.dtype == weight.dtype else None


class UpcastLinear(nn.Linear):
    """``nn.Linear`` with the float32-accumulating path above for half-precision compute on CPUs
    without half-precision units (``matmul`` = 'auto' | 'upcast' | 'native')."""

    def __init__(self, *args, matmul: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        if matmul not in MODES:
            raise ValueError(f"matmul must be one of {MODES}, got {matmul!r}")
        self.matmul = matmul

    def use_upcast(self, x: torch.Tensor) -> Optional[torch.dtype]:
        if self.matmul == "native" or self.weight.device.type != "cpu":
            return None
        dtype = compute_dtype(x, self.weight)
        if dtype not in HALF:
            return None
        return dtype if self.matmul == "upcast" or not cpu_has_half_matmul() else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.use_upcast(x)
        if dtype is None:
            return super().forward(x)
        w = self.weight if self.weight.dtype == dtype else self.weight.to(dtype)
        b = None if self.bias is None else self.bias.to(dtype)
        with torch.autocast("cpu", enabled=False):
            return _UpcastMatmul.apply(x.to(dtype), w, b)


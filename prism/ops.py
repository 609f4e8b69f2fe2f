"""Tensor operations shared by the samplers and the losses (both import them from here):

    categorical_draw  a token per position from softmax(log p / τ) after nucleus filtering, by the
                      inverse CDF in two levels (blocks of ``BLOCK`` tokens, then a token in the
                      block): x = min{v : Σ_{u ≤ v} p_u > U·Σ_u p_u}; two uniforms per position
    gumbel_max        the same law by Gumbel-max: argmax_v (log p_v / τ + G_v), G_v = −log(−log U_v)
    nucleus_filter    top-p (Holtzman et al. 2020): the smallest set of tokens whose mass reaches p
    select_top        per row, the top-n candidate positions by score
    device_generator  the generator a draw uses on the logits' device, derived from the caller's

Both draws work only at the positions asked for: they gather those (N, V) rows, a chunk at a time
(``chunk_elements``), so no (B, L, V) tensor is made and the temporaries are a few chunks.

Cost and precision. Gumbel-max needs one uniform per (position, token), N·V random numbers: on a
CPU that generation dominates (at V = 126,464 it is most of a draw's time). The inverse CDF needs two
uniforms per position and three passes over the row (max, exp, block sums). It is also the more
exact of the two: probabilities and the sums within a block are float32, the sums over blocks and
the uniforms float64, so a token is drawn with its probability up to float32 rounding (relative
~10⁻⁶), however small that probability is. Float32 Gumbel
noise has 24-bit uniforms, so G ≤ −log(−log(1 − 2⁻²⁴)) ≈ 16.6: a token more than about 17 nats
below the row's best is never drawn (Zheng et al. 2024 show how such truncation lowers diversity;
at V ~ 10⁵ the lost mass can reach 10⁵ · e⁻¹⁷ ≈ 4·10⁻³).
"""
from __future__ import annotations

from typing import Optional

import torch

CPU_CHUNK_ELEMENTS = 1 << 22  # a draw's rows per chunk on a CPU: 4M elements (16 MB float32, cache-sized)
DEVICE_CHUNK_ELEMENTS = 1 << 25  # on an accelerator: 32M elements (128 MB float32)
BLOCK = 256  # tokens per block of the two-level inverse CDF


def chunk_elements(device: torch.device) -> int:
    """Elements of (n, V) rows a draw processes at a time on ``device``."""
    return CPU_CHUNK_ELEMENTS if torch.device(device).type == "cpu" else DEVICE_CHUNK_ELEMENTS


def device_generator(generator: Optional[torch.Generator], device: torch.device) -> Optional[torch.Generator]:
    """The generator for a draw's random numbers on ``device``: ``generator`` itself when it already
    lives on that (non-CPU) device; otherwise a fresh ``torch.Generator(device)`` seeded by ONE 63-bit
    draw of ``generator``, so a seeded CPU generator replays exactly, it advances by one number per
    call whatever the amount drawn, and CUDA random numbers are made on the GPU (never copied over).
    ``None`` stays ``None`` (the global RNG of ``device``)."""
    if generator is None:
        return None
    device = torch.device(device)
    if generator.device.type != "cpu" and generator.device == device:
        return generator
    seed = int(torch.randint(0, 2**63 - 1, (), generator=generator, device=generator.device))
    return torch.Generator(device=device).manual_seed(seed)


NUCLEUS_TOP_K = 1024  # nucleus_filter looks at the top-k tokens first; a full sort only if they fall short


def _nucleus_drop_sorted(sorted_lp: torch.Tensor, top_p: float):
    """Per row of descending log-probs: (drop rank r when Σ_{j < r} p_(j) ≥ top_p, whether the row's
    mass reaches top_p); float64 sums."""
    probs = sorted_lp.to(torch.float64, copy=True).exp_()  # a copy: float64 input must stay untouched
    through = probs.cumsum(-1)
    return through.sub(probs) >= top_p, through[:, -1] >= top_p


def nucleus_filter(log_probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Top-p filtering per row (Holtzman et al. 2020): keep the smallest set of most probable tokens
    whose probability sums to at least ``top_p``, give the rest −inf (a new tensor; the input is
    untouched; the mass is summed in float64). A token is dropped when the mass strictly before it
    (in sorted order) already reaches ``top_p``, so the top token always stays. ``top_p >= 1``
    returns the input. The rows' ``NUCLEUS_TOP_K`` most probable tokens are looked at first; only
    the rows whose nucleus is larger are sorted whole."""
    if top_p >= 1.0:
        return log_probs
    V = log_probs.shape[-1]
    rows = log_probs.reshape(-1, V)
    values, order = rows.topk(min(NUCLEUS_TOP_K, V), dim=-1)  # descending, as a sort's first k
    drop, reached = _nucleus_drop_sorted(values, top_p)
    out = torch.full_like(rows, float("-inf")).scatter_(-1, order, values.masked_fill(drop, float("-inf")))
    if values.shape[-1] < V:
        short = reached.logical_not().nonzero().squeeze(1)  # the top k hold less than top_p: sort whole
        if short.numel():
            values, order = torch.sort(rows[short], dim=-1, descending=True)
            drop = torch.empty_like(values, dtype=torch.bool).scatter_(-1, order, _nucleus_drop_sorted(values, top_p)[0])
            out[short] = rows[short].masked_fill(drop, float("-inf"))
    return out.view(log_probs.shape)


def _prepare(rows: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """log softmax(rows / τ) (τ ≠ 1) and the nucleus filter, in the rows' dtype."""
    if temperature != 1.0:
        rows = torch.log_softmax(rows / temperature, dim=-1)
    return nucleus_filter(rows, top_p)


def _last_positive(mass: torch.Tensor) -> torch.Tensor:
    """(n,) index of the last column with mass > 0 (0 if none)."""
    cols = torch.arange(mass.shape[-1], device=mass.device)
    return torch.where(mass > 0, cols, 0).amax(-1)


def _icdf_rows(rows: torch.Tensor, generator, temperature: float, top_p: float, owned: bool) -> torch.Tensor:
    """(n,) long: one inverse-CDF draw per row of ``rows`` (n, V) (see ``categorical_draw``)."""
    if temperature == 0:
        return rows.argmax(-1)  # greedy; the nucleus always keeps the top token
    x = _prepare(rows, temperature, top_p).float()
    mine = owned or x is not rows  # a tensor of our own (gathered, filtered or cast) may be overwritten
    top = x.amax(-1, keepdim=True).clamp_(min=-1e30)  # a row of −inf gives mass 0, not NaN
    p = (x.sub_(top) if mine else x - top).exp_()  # ∝ the row's probabilities, float32
    n, V = p.shape
    K = V // BLOCK * BLOCK
    # a block's mass summed in float32 (256 terms), the blocks' cumulative sums in float64
    sums = [p[:, :K].view(n, V // BLOCK, BLOCK).sum(-1)] + ([p[:, K:].sum(-1, keepdim=True)] if K < V else [])
    mass = torch.cat(sums, 1).double()  # (n, blocks)
    u = torch.rand(n, 2, generator=generator, device=p.device, dtype=torch.float64)
    cdf = mass.cumsum(-1)
    block = torch.searchsorted(cdf, u[:, :1] * cdf[:, -1:], right=True).squeeze(1)
    block = torch.minimum(block, _last_positive(mass))  # U·Σ rounded up to Σ: the last block with mass
    cols = block[:, None] * BLOCK + torch.arange(BLOCK, device=p.device)
    inside = torch.where(cols < V, p.gather(1, cols.clamp(max=V - 1)).double(), 0.0)
    cdf = inside.cumsum(-1)
    k = torch.searchsorted(cdf, u[:, 1:] * cdf[:, -1:], right=True).squeeze(1)
    return block * BLOCK + torch.minimum(k, _last_positive(inside))


def _gumbel_rows(rows: torch.Tensor, generator, temperature: float, top_p: float, owned: bool) -> torch.Tensor:
    """(n,) long: one Gumbel-max draw per row of ``rows`` (n, V); noise and argmax in float32."""
    if temperature == 0:
        return rows.argmax(-1)
    rows = _prepare(rows, temperature, top_p).float()
    noise = torch.rand(rows.shape, generator=generator, device=rows.device, dtype=torch.float32)
    noise.clamp_(min=torch.finfo(torch.float32).tiny).log_().neg_().log_().neg_()  # G = −log(−log U)
    return noise.add_(rows).argmax(-1)


def _draw(row_draw, log_probs, generator, temperature, top_p, positions, fill) -> torch.Tensor:
    """Gather the rows at ``positions`` a chunk at a time, draw each with ``row_draw``, scatter back."""
    V = log_probs.shape[-1]
    lead = log_probs.shape[:-1]
    flat = log_probs.reshape(-1, V)
    if fill is None:
        out = torch.zeros(flat.shape[0], dtype=torch.long, device=log_probs.device)
    else:
        out = fill.reshape(-1).to(device=log_probs.device, dtype=torch.long, copy=True)
    index = None if positions is None else positions.reshape(-1).nonzero().squeeze(1)  # the one host sync
    n = flat.shape[0] if index is None else index.numel()
    if n == 0:
        return out.view(lead)
    noise_gen = None if temperature == 0 else device_generator(generator, log_probs.device)
    # top-p sorts (values + int64 indices) and sums in float64: about 8 times a chunk's bytes
    step = max(1, chunk_elements(log_probs.device) // (V if top_p >= 1.0 else 8 * V))
    drawn = torch.empty(n, dtype=torch.long, device=log_probs.device)
    for s in range(0, n, step):
        rows = flat[s:s + step] if index is None else flat[index[s:s + step]]  # indexing gathers a copy
        drawn[s:s + step] = row_draw(rows, noise_gen, temperature, top_p, index is not None)
    if index is None:
        return drawn.view(lead)
    return out.index_copy_(0, index, drawn).view(lead)


def categorical_draw(
    log_probs: torch.Tensor,
    generator: Optional[torch.Generator] = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    positions: Optional[torch.Tensor] = None,
    fill: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Categorical sampling by the inverse CDF: with p ∝ softmax(log p / τ) restricted to the
    nucleus ``top_p`` (``nucleus_filter``), x = min{v : Σ_{u ≤ v} p_u > U·Σ_u p_u}, U ~ U[0, 1),
    in two levels: a block of ``BLOCK`` tokens by its mass, then a token inside it by a second
    uniform (float32 probabilities and block sums; float64 cumulative sums and uniforms).
    ``temperature`` τ = 0 is greedy argmax and draws nothing.

    ``log_probs`` (..., V), any shift per row; returns (...) long. With ``positions`` (...) bool only
    those rows are drawn (gathered as (N, V) rows, a chunk at a time); the others hold ``fill``
    (default 0) and no random number is made for them. The uniforms come from
    ``device_generator(generator)`` on ``log_probs``' device."""
    return _draw(_icdf_rows, log_probs, generator, temperature, top_p, positions, fill)


def gumbel_max(
    log_probs: torch.Tensor,
    generator: Optional[torch.Generator] = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    positions: Optional[torch.Tensor] = None,
    fill: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Gumbel-max sampling: x = argmax_v (log p_v / τ + G_v), G_v = −log(−log U_v), U_v ~ U(0, 1)
    float32, after the nucleus filter; the same law and arguments as ``categorical_draw`` (one
    uniform per position and token: slower on a CPU, and truncated in the far tail, see the module
    docstring)."""
    return _draw(_gumbel_rows, log_probs, generator, temperature, top_p, positions, fill)


def select_top(scores: torch.Tensor, candidates: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Top-n selection per row: (B, L) bool, for each row b the ``counts[b]`` candidate positions
    with the highest ``scores`` (fewer if the row has fewer candidates; ties by sort order)."""
    scores = scores.double().masked_fill(~candidates, float("-inf"))
    order = torch.argsort(scores, dim=1, descending=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
    return (rank < counts[:, None]) & candidates

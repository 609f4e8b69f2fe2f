"""Tensor operations shared by the samplers and the losses (both import them from here):

    categorical_draw  a token per position from softmax(log p / τ) after nucleus filtering, by the
                      inverse CDF in two levels (blocks of ``BLOCK`` tokens, then a token in the
                      block): x = min{v : Σ_{u ≤ v} p_u > U·Σ_u p_u}; two uniforms per position
    gumbel_max        the same law by Gumbel-max: argmax_v (log p_v / τ + G_v), G_v = −log(−log U_v)
    nucleus_filter    top-p: 'within' (the ReMDM / MDLM / PRISM code: while the running sum is ≤ p)
                      or 'reach' (Holtzman et al. 2020: the smallest set whose mass reaches p)
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
NUCLEUS_READINGS = ("within", "reach")


def _nucleus_count(sorted_lp: torch.Tensor, top_p: float, nucleus: str):
    """Per row of descending log-probs: (how many tokens the nucleus keeps, whether these sorted
    values decide it); float64 sums. 'within': the ranks whose running sum Σ_{j ≤ r} p_(j) ≤ top_p,
    at least one (decided once the values' total exceeds top_p); 'reach': the ranks whose mass
    before them Σ_{j < r} p_(j) < top_p (decided once the total reaches top_p)."""
    probs = sorted_lp.to(torch.float64, copy=True).exp_()  # a copy: float64 input must stay untouched
    through = probs.cumsum(-1)
    if nucleus == "within":
        return (through <= top_p).sum(-1).clamp_(min=1), through[:, -1] > top_p
    return (through.sub(probs) < top_p).sum(-1).clamp_(min=1), through[:, -1] >= top_p


def nucleus_filter(log_probs: torch.Tensor, top_p: float, nucleus: str = "within") -> torch.Tensor:
    """Top-p filtering per row: keep the most probable tokens, give the rest −inf (a new tensor; the
    input is untouched; the mass is summed in float64). Which tokens (``nucleus``):

        'within'  (default) while the running sum of the sorted probabilities stays ≤ ``top_p``,
                  the top token always: the rule of the ReMDM, MDLM and PRISM code
                  (``cumsum <= p``, ``mask[..., 0] = True``) that every OWT number comes from
        'reach'   the smallest set whose mass reaches ``top_p`` (Holtzman et al. 2020): a token is
                  dropped when the mass before it already reaches ``top_p``; usually one token more

    Ties are ranked by token index (the lower first), so the kept set does not depend on the sort.
    ``top_p >= 1`` returns the input. The rows' ``NUCLEUS_TOP_K`` most probable tokens are looked
    at first; only the rows whose nucleus is not decided by them are sorted whole."""
    if nucleus not in NUCLEUS_READINGS:
        raise ValueError(f"unknown nucleus reading {nucleus!r}; known: {', '.join(NUCLEUS_READINGS)}")
    if top_p >= 1.0:
        return log_probs
    V = log_probs.shape[-1]
    rows = log_probs.reshape(-1, V)
    values = rows.topk(min(NUCLEUS_TOP_K, V), dim=-1).values  # descending, as a sort's first k
    count, decided = _nucleus_count(values, top_p, nucleus)
    boundary = values.gather(1, (count - 1)[:, None]).squeeze(1)  # the smallest kept value
    if values.shape[-1] < V:
        short = decided.logical_not().nonzero().squeeze(1)  # the top k do not decide: sort whole
        if short.numel():
            full = torch.sort(rows[short], dim=-1, descending=True).values
            count[short] = _nucleus_count(full, top_p, nucleus)[0]
            boundary[short] = full.gather(1, (count[short] - 1)[:, None]).squeeze(1)
    # keep the tokens above the smallest kept value and, of those equal to it, the lowest-index ones
    above, tied = rows > boundary[:, None], rows == boundary[:, None]
    need = count - above.sum(-1)
    keep = above | tied
    extra = (tied.sum(-1) > need).nonzero().squeeze(1)  # rows with a tie across the boundary
    if extra.numel():
        keep[extra] = above[extra] | (tied[extra] & (tied[extra].cumsum(-1) <= need[extra, None]))
    return rows.masked_fill(~keep, float("-inf")).view(log_probs.shape)


def _prepare(rows: torch.Tensor, temperature: float, top_p: float, nucleus: str) -> torch.Tensor:
    """log softmax(rows / τ) (τ ≠ 1) and the nucleus filter, in the rows' dtype."""
    if temperature != 1.0:
        rows = torch.log_softmax(rows / temperature, dim=-1)
    return nucleus_filter(rows, top_p, nucleus)


def _last_positive(mass: torch.Tensor) -> torch.Tensor:
    """(n,) index of the last column with mass > 0 (0 if none)."""
    cols = torch.arange(mass.shape[-1], device=mass.device)
    return torch.where(mass > 0, cols, 0).amax(-1)


def _greedy_rows(rows: torch.Tensor, top_p: float, nucleus: str, want_probs: bool):
    """τ = 0: the argmax (the nucleus always keeps the top token) and, if asked, its probability
    under the nucleus-filtered, renormalised τ = 1 law."""
    x = rows.argmax(-1)
    if not want_probs:
        return x, None
    lp = nucleus_filter(rows, top_p, nucleus).double().log_softmax(-1)
    return x, lp.gather(1, x[:, None]).squeeze(1).exp()


def _icdf_rows(rows, generator, temperature, top_p, nucleus, owned, want_probs):
    """One inverse-CDF draw per row of ``rows`` (n, V) (see ``categorical_draw``): (n,) long and,
    if ``want_probs``, (n,) float64 the drawn token's probability under the law drawn from."""
    if temperature == 0:
        return _greedy_rows(rows, top_p, nucleus, want_probs)
    x = _prepare(rows, temperature, top_p, nucleus).float()
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
    total = cdf[:, -1]
    block = torch.searchsorted(cdf, u[:, :1] * cdf[:, -1:], right=True).squeeze(1)
    block = torch.minimum(block, _last_positive(mass))  # U·Σ rounded up to Σ: the last block with mass
    cols = block[:, None] * BLOCK + torch.arange(BLOCK, device=p.device)
    inside = torch.where(cols < V, p.gather(1, cols.clamp(max=V - 1)).double(), 0.0)
    cdf = inside.cumsum(-1)
    k = torch.searchsorted(cdf, u[:, 1:] * cdf[:, -1:], right=True).squeeze(1)
    drawn = block * BLOCK + torch.minimum(k, _last_positive(inside))
    if not want_probs:
        return drawn, None
    return drawn, p.gather(1, drawn[:, None]).squeeze(1).double() / total


def _gumbel_rows(rows, generator, temperature, top_p, nucleus, owned, want_probs):
    """One Gumbel-max draw per row of ``rows`` (n, V); noise and argmax in float32 (and, if asked,
    the drawn token's probability under the law drawn from)."""
    if temperature == 0:
        return _greedy_rows(rows, top_p, nucleus, want_probs)
    rows = _prepare(rows, temperature, top_p, nucleus).float()
    noise = torch.rand(rows.shape, generator=generator, device=rows.device, dtype=torch.float32)
    noise.clamp_(min=torch.finfo(torch.float32).tiny).log_().neg_().log_().neg_()  # G = −log(−log U)
    drawn = noise.add_(rows).argmax(-1)
    if not want_probs:
        return drawn, None
    return drawn, (rows.gather(1, drawn[:, None]).squeeze(1).double() - rows.double().logsumexp(-1)).exp()


def _draw(row_draw, log_probs, generator, temperature, top_p, positions, fill, nucleus, return_probs):
    """Gather the rows at ``positions`` a chunk at a time, draw each with ``row_draw``, scatter back."""
    if nucleus not in NUCLEUS_READINGS:
        raise ValueError(f"unknown nucleus reading {nucleus!r}; known: {', '.join(NUCLEUS_READINGS)}")
    V = log_probs.shape[-1]
    lead = log_probs.shape[:-1]
    flat = log_probs.reshape(-1, V)
    if fill is None:
        out = torch.zeros(flat.shape[0], dtype=torch.long, device=log_probs.device)
    else:
        out = fill.reshape(-1).to(device=log_probs.device, dtype=torch.long, copy=True)
    probs = torch.full((flat.shape[0],), float("nan"), dtype=torch.float64, device=log_probs.device) if return_probs else None
    index = None if positions is None else positions.reshape(-1).nonzero().squeeze(1)  # the one host sync
    n = flat.shape[0] if index is None else index.numel()
    if n == 0:
        return (out.view(lead), probs.view(lead)) if return_probs else out.view(lead)
    noise_gen = None if temperature == 0 else device_generator(generator, log_probs.device)
    # top-p sorts (values + int64 indices) and sums in float64: about 8 times a chunk's bytes
    step = max(1, chunk_elements(log_probs.device) // (V if top_p >= 1.0 else 8 * V))
    drawn = torch.empty(n, dtype=torch.long, device=log_probs.device)
    drawn_p = torch.empty(n, dtype=torch.float64, device=log_probs.device) if return_probs else None
    for s in range(0, n, step):
        rows = flat[s:s + step] if index is None else flat[index[s:s + step]]  # indexing gathers a copy
        drawn[s:s + step], p = row_draw(rows, noise_gen, temperature, top_p, nucleus, index is not None, return_probs)
        if return_probs:
            drawn_p[s:s + step] = p
    if index is None:
        out, probs = drawn, drawn_p
    else:
        out.index_copy_(0, index, drawn)
        if return_probs:
            probs.index_copy_(0, index, drawn_p)
    return (out.view(lead), probs.view(lead)) if return_probs else out.view(lead)


def categorical_draw(
    log_probs: torch.Tensor,
    generator: Optional[torch.Generator] = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    positions: Optional[torch.Tensor] = None,
    fill: Optional[torch.Tensor] = None,
    nucleus: str = "within",
    return_probs: bool = False,
):
    """Categorical sampling by the inverse CDF: with p ∝ softmax(log p / τ) restricted to the
    nucleus ``top_p`` (``nucleus_filter`` with the reading ``nucleus``, 'within' or 'reach'),
    x = min{v : Σ_{u ≤ v} p_u > U·Σ_u p_u}, U ~ U[0, 1), in two levels: a block of ``BLOCK``
    tokens by its mass, then a token inside it by a second uniform (float32 probabilities and block
    sums; float64 cumulative sums and uniforms). ``temperature`` τ = 0 is greedy argmax and draws
    nothing.

    ``log_probs`` (..., V), any shift per row; returns (...) long. With ``positions`` (...) bool only
    those rows are drawn (gathered as (N, V) rows, a chunk at a time); the others hold ``fill``
    (default 0) and no random number is made for them. The uniforms come from
    ``device_generator(generator)`` on ``log_probs``' device. ``return_probs``: also (...) float64,
    each drawn token's probability under the law it was drawn from (after the nucleus filter and
    renormalising; for τ = 0 the filtered τ = 1 law), NaN where nothing was drawn."""
    return _draw(_icdf_rows, log_probs, generator, temperature, top_p, positions, fill, nucleus, return_probs)


def gumbel_max(
    log_probs: torch.Tensor,
    generator: Optional[torch.Generator] = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    positions: Optional[torch.Tensor] = None,
    fill: Optional[torch.Tensor] = None,
    nucleus: str = "within",
    return_probs: bool = False,
):
    """Gumbel-max sampling: x = argmax_v (log p_v / τ + G_v), G_v = −log(−log U_v), U_v ~ U(0, 1)
    float32, after the nucleus filter; the same law and arguments as ``categorical_draw`` (one
    uniform per position and token: slower on a CPU, and truncated in the far tail, see the module
    docstring)."""
    return _draw(_gumbel_rows, log_probs, generator, temperature, top_p, positions, fill, nucleus, return_probs)


def select_top(scores: torch.Tensor, candidates: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Top-n selection per row: (B, L) bool, for each row b the ``counts[b]`` candidate positions
    with the highest ``scores`` (fewer if the row has fewer candidates; ties by sort order)."""
    scores = scores.double().masked_fill(~candidates, float("-inf"))
    order = torch.argsort(scores, dim=1, descending=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
    return (rank < counts[:, None]) & candidates

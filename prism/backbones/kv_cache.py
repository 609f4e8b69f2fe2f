"""Approximate key/value cache for semi-autoregressive sampling (Fast-dLLM, Wu et al. 2025).

A masked-diffusion model attends bidirectionally, so no key or value is ever exact once any token
changes; Fast-dLLM observes that between neighbouring denoising steps they barely move and reuses them:

- a *refresh* (a full pass with ``cache=KVCache()``) stores every attention layer's keys and values
  for all L positions;
- a *partial* pass with ``compute=(lo, hi)`` runs only positions lo..hi-1, writes their new keys and
  values in place over the cached ones and attends over all L cached positions. ``compute=(lo, hi)``
  is the *dual cache* (prefix and suffix reused); ``compute=(lo, L)`` with ``keep=(lo, hi)`` the
  *prefix cache* (the suffix is recomputed, only the block's outputs are kept).

Per-row passes (so that a row's sample never depends on its batch-mates): ``select(rows, own)`` makes
the next pass work on a sub-batch. A refresh of ``rows`` rewrites only those rows' entries; a partial
pass of ``rows`` over lo..hi-1 writes, per row, only the columns ``own`` marks (that row's window) and
lets every other column keep the row's keys and values from its own last refresh.

Meant for inference (under ``torch.no_grad``): the cached tensors are detached.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Dict, Optional, Tuple

import torch

Range = Optional[Tuple[int, int]]


class KVCache:
    """Per attention layer, the keys and values (B, H, L, Dh) of every position, from the last full pass.

    ``rows`` / ``own`` (set by ``select`` for one pass): the sub-batch the pass runs on (a (b,) index into
    the cache's B rows, None: all) and, on a partial pass, the (b, L) columns each row may write (None:
    every computed column). ``batch_size``: the cache's B, so a first refresh of a sub-batch can size it."""

    def __init__(self, batch_size: Optional[int] = None):
        self.layers: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}  # after rotary, in the model's dtype
        self.batch_size = batch_size
        self.rows: Optional[torch.Tensor] = None
        self.own: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return len(self.layers)

    @contextmanager
    def select(self, rows: Optional[torch.Tensor] = None, own: Optional[torch.Tensor] = None):
        """Run the passes inside on the sub-batch ``rows``, writing on a partial pass only ``own``."""
        self.rows, self.own = rows, own
        try:
            yield self
        finally:
            self.rows = self.own = None

    def _store(self, name: str, k: torch.Tensor, v: torch.Tensor) -> None:
        """A refresh: all L positions of the selected rows (all rows: reusing the storage when it fits)."""
        old = self.layers.get(name)
        rows = self.rows
        if rows is None:
            if old is not None and old[0].shape == k.shape and old[0].dtype == k.dtype and old[0].device == k.device:
                # reuse the storage: a refresh does not hold two caches at once
                old[0].copy_(k.detach())
                old[1].copy_(v.detach())
            else:
                self.layers[name] = (k.detach().contiguous(), v.detach().contiguous())
            return
        full = (self.batch_size,) + tuple(k.shape[1:])
        if self.batch_size is None:
            raise ValueError("a refresh of a sub-batch (KVCache.select(rows=...)) needs KVCache(batch_size=B)")
        if old is None or tuple(old[0].shape) != full or old[0].dtype != k.dtype or old[0].device != k.device:
            old = (k.new_zeros(full), v.new_zeros(full))  # rows never refreshed are never read
            self.layers[name] = old
        old[0][rows] = k.detach()
        old[1][rows] = v.detach()

    def update(self, name: str, k: torch.Tensor, v: torch.Tensor, compute: Range = None):
        """The keys and values layer ``name`` attends over. Refresh (``compute`` None): store ``k``, ``v``
        (all L positions) and return them. Partial: write ``k``, ``v`` (positions lo..hi-1; only the
        ``own`` columns when selected) into the cached tensors in place (no copy of the cache per step
        when all rows run) and return the (selected rows') whole cached (k, v)."""
        if compute is None:
            self._store(name, k, v)
            return k, v
        if name not in self.layers:
            raise ValueError(f"KV cache has no entry for attention layer {name!r}: run a refresh pass "
                             "(cache given, compute=None) on this model first")
        ck, cv = self.layers[name]
        lo, hi = compute
        rows = self.rows
        n = ck.shape[0] if rows is None else rows.shape[0]
        if (n, ck.shape[1]) != tuple(k.shape[:2]) or ck.shape[3] != k.shape[3] or k.shape[2] != hi - lo:
            raise ValueError(f"KV cache entry {name!r} has shape {tuple(ck.shape)}, incompatible with new keys "
                             f"{tuple(k.shape)} for positions {lo}..{hi - 1}")
        if rows is not None:  # the sub-batch's own copy, written back below
            ck, cv = ck[rows], cv[rows]
        k, v = k.detach(), v.detach()
        if self.own is not None:  # other columns keep this row's cached keys and values
            own = self.own[:, None, lo:hi, None].to(ck.device)
            k = torch.where(own, k, ck[:, :, lo:hi])
            v = torch.where(own, v, cv[:, :, lo:hi])
        ck[:, :, lo:hi] = k
        cv[:, :, lo:hi] = v
        if rows is not None:
            store_k, store_v = self.layers[name]
            store_k[rows, :, lo:hi] = k
            store_v[rows, :, lo:hi] = v
        return ck, cv

    def bind(self, name: str, compute: Range = None) -> Callable:
        """``update`` for one layer, as the ``kv`` hook attention layers take."""
        return lambda k, v: self.update(name, k, v, compute)


def cache_ranges(cache: Optional[KVCache], compute: Range, keep: Range, length: int) -> Tuple[int, int, int, int]:
    """Check a forward's ``cache`` / ``compute`` / ``keep`` for a sequence of ``length`` positions and
    return (lo, hi, a, b): the computed range and the kept one (defaults: all positions, keep = compute).
    Without a cache every position is computed and ``keep`` alone restricts the output layer (a sampler
    that uses only a window's logits skips the rest of the (B, L, V) work)."""
    if cache is None:
        if compute is not None:
            raise ValueError("compute= needs a KV cache (cache=KVCache()); without one the whole sequence is "
                             "computed (keep= alone restricts the output layer)")
        a, b = (0, length) if keep is None else (int(keep[0]), int(keep[1]))
        if not 0 <= a <= b <= length:
            raise ValueError(f"keep={keep} must lie inside the computed positions [0, {length})")
        return 0, length, a, b
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be a prism.backbones.base.KVCache, got {type(cache).__name__}")
    lo, hi = (0, length) if compute is None else (int(compute[0]), int(compute[1]))
    if not 0 <= lo < hi <= length:
        raise ValueError(f"compute={compute} is not a non-empty range inside [0, {length})")
    if compute is not None:
        if not cache.layers:
            raise ValueError("compute= needs a filled KV cache: run a refresh pass (cache=KVCache(), "
                             "compute=None) on the full sequence first")
        lengths = {kv[0].shape[2] for kv in cache.layers.values()}
        if lengths != {length}:
            raise ValueError(f"the KV cache was filled for sequence length(s) {sorted(lengths)}, the input has "
                             f"{length}: refresh it")
    a, b = (lo, hi) if keep is None else (int(keep[0]), int(keep[1]))
    if not lo <= a <= b <= hi:
        raise ValueError(f"keep={keep} must lie inside the computed positions [{lo}, {hi})")
    return lo, hi, a, b


def key_padding_bias(attention_mask: Optional[torch.Tensor], dtype: torch.dtype, device) -> Optional[torch.Tensor]:
    """(B, L) keep-mask → (B, 1, 1, L) additive bias over keys (dtype-min at padding), or None when
    nothing is padded. Built from the full mask, so it serves queries of any computed range."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    keep = attention_mask.bool()[:, None, None, :].to(device)
    return torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill(~keep, torch.finfo(dtype).min)

"""The contract every MDM backbone meets, so heads, losses and samplers attach to any of them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn



@dataclass
class BackboneOutput:
    """``hidden_states``: (B, L, hidden_size), the final hidden state that produced ``logits``
    (what a quality head reads); ``logits``: (B, L, vocab_size), raw unmasking logits (the SUBS
    parameterisation is applied by ``prism.model.MDM``, not here); ``cond``: (B, cond_dim), the
    adaLN conditioning vector of backbones that have one (the DiT), else None."""

    hidden_states: torch.Tensor
    logits: torch.Tensor
    cond: Optional[torch.Tensor] = None


class Backbone(nn.Module):
    """Token ids in; final hidden states and unmasking logits out.

    Subclasses set ``vocab_size`` (including the mask token), ``mask_id``, ``hidden_size`` (and
    ``cond_dim`` if they return ``cond``) and
    implement ``forward(input_ids, attention_mask=None, t=None)``:

    - ``input_ids``: (B, L) long, masked positions hold ``mask_id``;
    - ``attention_mask``: optional (B, L) bool/0-1, False marks padding that no token may attend to;
    - ``t``: optional (B,) diffusion time, used only by time-conditioned backbones.

    Backbones with ``supports_kv_cache`` also take ``cache``, ``compute`` and ``keep`` (Fast-dLLM's
    approximate KV cache, see ``prism.backbones.kv_cache``); ``input_ids`` / ``attention_mask`` are
    always the full (B, L):

    - ``cache=KVCache()``, ``compute=None``: a full pass that also stores every attention layer's (k, v);
    - ``compute=(lo, hi)`` (cache filled): only positions lo..hi-1 are computed, their k, v written into
      the cache in place, attending over all L cached positions; ``hidden_states`` is (B, hi-lo, D);
    - ``keep=(a, b)`` (lo <= a <= b <= hi): the output layer runs on positions a..b-1 only
      (``logits`` (B, b-a, V)); ``hidden_states`` still covers the computed range (a head reads it).
    """

    released_names = ("", "")  # (strip, add): own module names -> the released model's (prism.hub_adapter)

    vocab_size: int
    mask_id: int
    hidden_size: int
    cond_dim: Optional[int] = None  # width of ``BackboneOutput.cond`` (quality heads modulate with it)
    # True if ``forward`` takes ``logits=False`` and then skips its output layer (``logits`` None):
    # ``MDM`` asks for it on passes that need only the hidden states (the quality head's)
    skips_logits: bool = False
    # True if ``forward`` takes ``cache`` / ``compute`` / ``keep`` (the approximate KV cache)
    supports_kv_cache: bool = False

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        t: Optional[torch.Tensor] = None,
    ) -> BackboneOutput:  # pragma: no cover - interface
        raise NotImplementedError

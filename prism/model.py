"""``models.mdm``: an MDM = backbone + optional quality head: ONE forward pass gives both the
unmasking posterior and the per-token quality. ``models.token_critic``: the separate critic network
of the Token-Critic baseline (Lezama et al. 2023), held by the MDM so that it is checkpointed and
sampled with it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import gin
import torch
from torch import nn

from prism.backbones.base import Backbone
from prism.backbones.kv_cache import cache_ranges


@dataclass
class MDMOutput:
    """``log_probs``: (B, L, V) SUBS log-posterior over clean tokens (None when the pass was asked
    for the quality only); ``hidden_states``: (B, L, D);
    ``quality_logits``: (B, L) logit of g_i (None without a head); ``token_log_probs``: (B, L) the
    model's own log-probability of the token present at each position, before SUBS carries clean
    tokens over (what P2-self remasks by). With a KV cache (``MDM.forward``'s ``compute`` / ``keep``) the
    per-position fields cover the kept positions a..b-1 and ``hidden_states`` the computed ones."""

    log_probs: Optional[torch.Tensor]
    hidden_states: torch.Tensor
    quality_logits: Optional[torch.Tensor] = None
    token_log_probs: Optional[torch.Tensor] = None


LOG_SOFTMAX_CHUNK = 1 << 24  # elements per in-place log-softmax chunk (64 MB float32)


def _subs_inplace(buf: torch.Tensor, input_ids: torch.Tensor, mask_id: int) -> torch.Tensor:
    """Turn the logits in ``buf`` (B, L, V), float, contiguous, into SUBS log-probs IN PLACE (one
    log-softmax over rows, a chunk at a time, so no second (B, L, V) tensor); returns the (B, L)
    log-probability of each present token before the carry-over."""
    V = buf.shape[-1]
    buf[..., mask_id] = float("-inf")  # zero masking probability
    for rows in buf.view(-1, V).split(max(1, LOG_SOFTMAX_CHUNK // V)):
        rows.copy_(torch.log_softmax(rows, dim=-1))
    token_log_probs = buf.gather(-1, input_ids[..., None]).squeeze(-1)
    clean = input_ids != mask_id
    # carry-over on the token level: a clean row becomes log one-hot(token) (0 there, −inf elsewhere)
    buf.masked_fill_(clean[..., None], float("-inf"))
    at_token = torch.zeros_like(token_log_probs).masked_fill_(~clean, float("-inf"))
    buf.scatter_(-1, input_ids[..., None], at_token[..., None])  # masked rows: writes −inf at mask_id again
    return token_log_probs


class _SUBSLogSoftmax(torch.autograd.Function):
    """SUBS log-probs with one (B, L, V) output and nothing else kept for backward. Backward of
    y = log_softmax(x) on masked rows: ∂x = g − softmax(x)·Σ_v g_v = g − exp(y)·Σ_v g_v; the mask
    column (−inf before the softmax) and the clean rows (constants) get zero gradient."""

    @staticmethod
    def forward(ctx, logits, input_ids, mask_id):
        buf = logits.detach().to(dtype=torch.promote_types(logits.dtype, torch.float32),
                                 memory_format=torch.contiguous_format, copy=True)
        token_log_probs = _subs_inplace(buf, input_ids, mask_id)
        ctx.mask_id, ctx.in_dtype = mask_id, logits.dtype
        ctx.save_for_backward(buf, input_ids)
        ctx.mark_non_differentiable(token_log_probs)
        return buf, token_log_probs

    @staticmethod
    def backward(ctx, grad, _unused):
        y, input_ids = ctx.saved_tensors
        clean = (input_ids != ctx.mask_id)[..., None]
        total = grad.sum(-1, keepdim=True)
        dx = y.exp().mul_(total.neg_()).add_(grad)  # the only new (B, L, V) tensor
        dx.masked_fill_(clean, 0.0)
        dx[..., ctx.mask_id] = 0.0
        return dx.to(ctx.in_dtype), None, None


def subs_log_probs(logits: torch.Tensor, input_ids: torch.Tensor, mask_id: int, return_token_log_probs: bool = False,
                   inplace: bool = False):
    """SUBS parameterisation (MDLM §3.2): log_softmax of the logits with the mask token at −inf ("zero
    masking probabilities"); unmasked positions carry over their token ("carry-over unmasking": log
    one-hot). With ``return_token_log_probs`` also the (B, L) log-probability of each present token
    before the carry-over.

    Memory: one (B, L, V) float tensor is made (none when ``inplace`` and the logits are already
    float32/64 and contiguous: they are overwritten, for callers that own them, e.g. ``MDM.forward``
    under no_grad). With autograd the backward keeps only that output (``_SUBSLogSoftmax``)."""
    if torch.is_grad_enabled() and logits.requires_grad:
        subs, token_log_probs = _SUBSLogSoftmax.apply(logits, input_ids, mask_id)
    else:
        dtype = torch.promote_types(logits.dtype, torch.float32)
        own = inplace and logits.dtype == dtype and logits.is_contiguous()
        buf = logits.detach() if own else logits.detach().to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)
        token_log_probs = _subs_inplace(buf, input_ids, mask_id)
        subs = buf
    if return_token_log_probs:
        return subs, token_log_probs
    return subs


def build_head(head, backbone: Backbone) -> Optional[nn.Module]:
    """A head given as a module is used as is; given as a builder (gin ``@heads.linear`` without
    parentheses, or any callable) it is called with the backbone's ``hidden_size`` and ``cond_dim``."""
    if head is None or isinstance(head, nn.Module):
        return head
    if not callable(head):
        raise TypeError(f"a head must be an nn.Module or a builder, got {type(head).__name__}")
    return head(hidden_size=backbone.hidden_size, cond_dim=getattr(backbone, "cond_dim", None))


@gin.configurable("token_critic", module="models")
class TokenCritic(nn.Module):
    """Token-Critic (Lezama et al. 2023): a separate network that reads a fully filled sequence x̂ and
    gives, per position, the logit that the token is real (from the data) rather than generated.
    Built from parts: any backbone (its own small DiT) + a head on its hidden states."""

    def __init__(self, backbone: Backbone, head: Union[nn.Module, Callable] = None):
        super().__init__()
        if head is None:
            from prism.heads.quality import LinearHead

            head = LinearHead
        self.backbone = backbone
        self.head = build_head(head, backbone)

    def forward(self, tokens: torch.Tensor, attention_mask=None) -> torch.Tensor:
        out = self.backbone(tokens, attention_mask=attention_mask)
        return self.head(out.hidden_states, out.cond, attention_mask)


@gin.configurable("mdm", module="models")
class MDM(nn.Module):
    """Backbone + optional quality head (PRISM) + optional Token-Critic. ``forward`` returns an
    ``MDMOutput`` from ONE backbone pass: unmasking log-probs and, with a head, the quality logits.

    ``head``: a quality head module or builder (``models.mdm.head = @heads.linear``).
    ``critic``: a ``TokenCritic``; it is not run by ``forward`` (it reads x̂, not z): see ``critic_logits``.
    """

    def __init__(self, backbone: Backbone, head: Union[nn.Module, Callable, None] = None,
                 critic: Optional[TokenCritic] = None):
        super().__init__()
        if not isinstance(backbone, Backbone):
            raise TypeError(
                f"models.mdm.backbone must be a prism.backbones.Backbone, got {type(backbone).__name__}"
            )
        self.backbone = backbone
        self.head = build_head(head, backbone)
        self.critic = critic

    @property
    def mask_id(self) -> int:
        return self.backbone.mask_id

    @property
    def time_conditioned(self) -> bool:
        """Whether the prediction depends on t (then a sampler may not reuse it at another t)."""
        return bool(getattr(self.backbone, "time_conditioning", False))

    @property
    def vocab_size(self) -> int:
        return self.backbone.vocab_size

    supports_keep = True  # forward(..., keep=(a, b)) without a cache: outputs for positions a..b-1 only

    @property
    def supports_kv_cache(self) -> bool:
        """Whether ``forward`` takes ``cache`` / ``compute`` / ``keep`` (backbone and head both do)."""
        head_ok = self.head is None or bool(getattr(self.head, "supports_kv_cache", False))
        return bool(getattr(self.backbone, "supports_kv_cache", False)) and head_ok

    def forward(self, input_ids, attention_mask=None, t=None, log_probs: bool = True, cache=None, compute=None,
                keep=None) -> MDMOutput:
        """One backbone pass → SUBS log-probs (``subs_log_probs``, written over the backbone's fresh
        logits when no graph is kept) and the head's quality logits. ``log_probs=False`` skips the
        SUBS step (``log_probs`` and ``token_log_probs`` are None): for a pass that only needs the
        quality, e.g. PRISM's pass on y.

        ``cache`` (a ``KVCache``), ``compute=(lo, hi)``, ``keep=(a, b)``: Fast-dLLM's approximate KV cache
        (``prism.backbones.kv_cache``), passed to the backbone and the head. ``input_ids`` / ``attention_mask``
        stay the full (B, L); ``hidden_states`` covers the computed positions (a refresh: all L), while
        ``log_probs``, ``token_log_probs`` and ``quality_logits`` cover positions a..b-1 (default: compute).
        ``keep`` without a cache: every position is computed (the head reads all L hidden states), the
        output layer and the SUBS softmax run on a..b-1 only (a sampler's window)."""
        if cache is not None and not self.supports_kv_cache:
            parts = [type(self.backbone).__name__] + ([type(self.head).__name__] if self.head is not None else [])
            raise ValueError(f"{' + '.join(parts)} does not support the KV cache (supports_kv_cache is False): "
                             "use samplers.semi_ar.cache = 'none'")
        lo, _, a, b = cache_ranges(cache, compute, keep, input_ids.shape[1])
        narrow = getattr(self.backbone, "supports_kv_cache", False)  # its forward takes keep= (output layer on a..b-1)
        if cache is not None:
            kw = dict(cache=cache, compute=compute, keep=keep)
        else:
            kw = {"keep": keep} if keep is not None and narrow else {}
        # a backbone that can skip its output layer does so when the pass needs no log-probs
        skip = {"logits": False} if not log_probs and getattr(self.backbone, "skips_logits", False) else {}
        out = self.backbone(input_ids, attention_mask=attention_mask, t=t, **skip, **kw)
        logits = out.logits
        if cache is None and keep is not None and not narrow and logits is not None:
            logits = logits[:, a:b]  # a backbone without keep=: at least the SUBS softmax runs on a..b-1 only
        quality = None
        if self.head is not None:
            head_kw = {} if cache is None else dict(cache=cache, compute=compute)
            quality = self.head(out.hidden_states, out.cond, attention_mask, **head_kw)[:, a - lo:b - lo]
        if not log_probs:
            return MDMOutput(None, out.hidden_states, quality, None)
        subs, token_log_probs = subs_log_probs(logits, input_ids[:, a:b], self.mask_id,
                                               return_token_log_probs=True, inplace=True)
        return MDMOutput(subs, out.hidden_states, quality, token_log_probs)

    def critic_logits(self, tokens: torch.Tensor, attention_mask=None) -> torch.Tensor:
        """(B, L) Token-Critic logits of "this token is real" on a fully filled sequence."""
        if self.critic is None:
            raise ValueError("this model has no Token-Critic: set models.mdm.critic = @models.token_critic()")
        return self.critic(tokens, attention_mask)

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


@dataclass
class MDMOutput:
    """``log_probs``: (B, L, V) SUBS log-posterior over clean tokens; ``hidden_states``: (B, L, D);
    ``quality_logits``: (B, L) logit of g_i (None without a head); ``token_log_probs``: (B, L) the
    model's own log-probability of the token present at each position, before SUBS carries clean
    tokens over (what P2-self remasks by)."""

    log_probs: torch.Tensor
    hidden_states: torch.Tensor
    quality_logits: Optional[torch.Tensor] = None
    token_log_probs: Optional[torch.Tensor] = None


def subs_log_probs(logits: torch.Tensor, input_ids: torch.Tensor, mask_id: int, return_token_log_probs: bool = False):
    """SUBS parameterisation (MDLM §3.2): the mask token gets zero probability ("zero masking
    probabilities") and unmasked positions carry over their token ("carry-over unmasking").
    With ``return_token_log_probs`` also the (B, L) log-probability of each present token before
    the carry-over."""
    never_mask = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    never_mask[mask_id] = True
    log_probs = torch.log_softmax(logits.float().masked_fill(never_mask, float("-inf")), dim=-1)
    clean = input_ids != mask_id
    carry = torch.full_like(log_probs, float("-inf")).scatter(-1, input_ids[..., None], 0.0)
    subs = torch.where(clean[..., None], carry, log_probs)
    if return_token_log_probs:
        return subs, log_probs.gather(-1, input_ids[..., None]).squeeze(-1)
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

    def forward(self, input_ids, attention_mask=None, t=None) -> MDMOutput:
        out = self.backbone(input_ids, attention_mask=attention_mask, t=t)
        quality = self.head(out.hidden_states, out.cond, attention_mask) if self.head is not None else None
        log_probs, token_log_probs = subs_log_probs(out.logits, input_ids, self.mask_id, return_token_log_probs=True)
        return MDMOutput(log_probs, out.hidden_states, quality, token_log_probs)

    def critic_logits(self, tokens: torch.Tensor, attention_mask=None) -> torch.Tensor:
        """(B, L) Token-Critic logits of "this token is real" on a fully filled sequence."""
        if self.critic is None:
            raise ValueError("this model has no Token-Critic: set models.mdm.critic = @models.token_critic()")
        return self.critic(tokens, attention_mask)

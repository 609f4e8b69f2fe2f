"""``models.mdm``: an MDM = backbone + optional quality head: ONE forward pass gives both the
unmasking posterior and the per-token quality."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import gin
import torch
from torch import nn

from prism.backbones.base import Backbone


@dataclass
class MDMOutput:
    """``log_probs``: (B, L, V) SUBS log-posterior over clean tokens; ``hidden_states``: (B, L, D);
    ``quality_logits``: (B, L) logit of g_i (None without a head)."""

    log_probs: torch.Tensor
    hidden_states: torch.Tensor
    quality_logits: Optional[torch.Tensor] = None


def subs_log_probs(logits: torch.Tensor, input_ids: torch.Tensor, mask_id: int) -> torch.Tensor:
    """SUBS parameterisation (MDLM §3.2): the mask token gets zero probability ("zero masking
    probabilities") and unmasked positions carry over their token ("carry-over unmasking")."""
    never_mask = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    never_mask[mask_id] = True
    log_probs = torch.log_softmax(logits.float().masked_fill(never_mask, float("-inf")), dim=-1)
    clean = input_ids != mask_id
    carry = torch.full_like(log_probs, float("-inf")).scatter(-1, input_ids[..., None], 0.0)
    return torch.where(clean[..., None], carry, log_probs)


@gin.configurable("mdm", module="models")
class MDM(nn.Module):
    """Backbone (+ quality head, issue 3). ``forward`` returns an ``MDMOutput`` from one pass."""

    def __init__(self, backbone: Backbone, head: Optional[nn.Module] = None):
        super().__init__()
        if not isinstance(backbone, Backbone):
            raise TypeError(
                f"models.mdm.backbone must be a prism.backbones.Backbone, got {type(backbone).__name__}"
            )
        self.backbone = backbone
        self.head = head

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
        quality = self.head(out.hidden_states) if self.head is not None else None
        return MDMOutput(subs_log_probs(out.logits, input_ids, self.mask_id), out.hidden_states, quality)

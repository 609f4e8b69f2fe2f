"""``backbones.hf``: any transformers model used bidirectionally as an MDM backbone.

A decoder such as Llama is causal by default. transformers 5 honours a user-supplied 4D *float*
additive mask as is (0 where attention is allowed, dtype-min for padding keys), which gives true
bidirectional attention with both eager and SDPA kernels; a boolean 4D mask leaks padding with
eager attention and ``is_causal=False`` alone only works with SDPA and no padding.

``hidden_states`` is the model's last hidden state (after its final norm), the input of its
LM head, so a quality head reads exactly what produced the logits.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from prism.backbones.base import Backbone, BackboneOutput
from registry import BACKBONES

AUTO_CLASSES = {"causal_lm": "AutoModelForCausalLM", "masked_lm": "AutoModelForMaskedLM"}


def bidirectional_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) keep-mask → (B, 1, L, L) additive float mask: every query sees every non-padding key."""
    keep = attention_mask.bool()[:, None, None, :].expand(-1, 1, attention_mask.shape[1], -1)
    return torch.zeros(keep.shape, dtype=dtype, device=attention_mask.device).masked_fill(~keep, torch.finfo(dtype).min)


@BACKBONES.register("hf")
class HFBackbone(Backbone):
    """Wrap a transformers model. Either ``model_name_or_path`` (a hub id or a local directory,
    loaded with ``from_pretrained``) or ``config`` (a dict with ``model_type``, built with random
    weights, e.g. a tiny Llama for tests). ``mask_id`` defaults to the last vocabulary entry."""

    released_names = ("model.", "")  # the wrapped transformers model is the released one

    def __init__(
        self,
        model_name_or_path: Optional[str] = None,
        config: Optional[Dict[str, Any]] = None,
        mask_id: Optional[int] = None,
        auto_class: str = "causal_lm",
        dtype: str = "float32",
        attn_implementation: str = "sdpa",
        trust_remote_code: bool = False,
    ):
        super().__init__()
        import transformers

        if (model_name_or_path is None) == (config is None):
            raise ValueError("backbones.hf needs exactly one of model_name_or_path or config")
        if auto_class not in AUTO_CLASSES:
            raise ValueError(f"backbones.hf.auto_class must be one of {list(AUTO_CLASSES)}, got {auto_class!r}")
        auto = getattr(transformers, AUTO_CLASSES[auto_class])
        torch_dtype = getattr(torch, dtype)
        if model_name_or_path is not None:
            self.model = auto.from_pretrained(
                model_name_or_path, dtype=torch_dtype, attn_implementation=attn_implementation,
                trust_remote_code=trust_remote_code,
            )
        else:
            cfg = dict(config)
            if "model_type" not in cfg:
                raise ValueError("backbones.hf.config needs a 'model_type' (e.g. 'llama'), as in a config.json")
            model_type = cfg.pop("model_type")
            hf_config = transformers.AutoConfig.for_model(model_type, **cfg)
            hf_config._attn_implementation = attn_implementation
            self.model = auto.from_config(hf_config, dtype=torch_dtype)
        self.vocab_size = self.model.config.vocab_size
        self.mask_id = self.vocab_size - 1 if mask_id is None else mask_id
        if not 0 <= self.mask_id < self.vocab_size:
            raise ValueError(f"mask_id {self.mask_id} is outside the vocabulary [0, {self.vocab_size})")
        self.hidden_size = self.model.config.hidden_size

    def forward(self, input_ids, attention_mask=None, t=None) -> BackboneOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        mask = bidirectional_mask(attention_mask, self.model.dtype)
        out = self.model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
        return BackboneOutput(hidden_states=out.hidden_states[-1], logits=out.logits)

"""``adapters``: parameter-efficient fine-tuning added to a built model (``experiment.adapter``).

An adapter is a gin-configurable object with ``apply(model)``: it changes the model in place after
its base weights are loaded (``prism.experiment.build_experiment``) and says which parameter names
train (``trainable_names``). ``adapters.lora`` (``prism/adapters/lora.py``) is the one built in.

``parameter_counts`` / ``parameter_report``: trainable and total parameters (tied tensors once), the
line a training run prints at its start.
"""
from __future__ import annotations

from typing import Tuple

from torch import nn


def parameter_counts(model: nn.Module) -> Tuple[int, int]:
    """(trainable, total) numbers of parameter elements, each shared (tied) tensor counted once."""
    trainable = total = 0
    for p in model.parameters():  # parameters() yields each shared tensor once
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def parameter_report(model: nn.Module) -> str:
    """``'trainable 1,234 / 8,015,000,000 (0.02%)'``."""
    trainable, total = parameter_counts(model)
    share = 100.0 * trainable / total if total else 0.0
    return f"trainable {trainable:,} / {total:,} ({share:.2f}%)"


def has_adapter(model: nn.Module) -> bool:
    """Whether an adapter (a peft LoRA layer) was injected somewhere in ``model``."""
    from prism.adapters.lora import lora_layers

    return bool(lora_layers(model))

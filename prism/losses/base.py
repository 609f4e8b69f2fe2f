"""The loss contract: ``loss(model, batch, generator) -> LossOutput``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict

import torch
from torch import nn


@dataclass
class LossOutput:
    """``loss``: the scalar to backpropagate; ``logs``: detached scalars to report."""

    loss: torch.Tensor
    logs: Dict[str, torch.Tensor] = field(default_factory=dict)


class Loss(nn.Module):
    """A training objective. It is an ``nn.Module`` so that ``prism.training.loop`` can wrap model and loss
    together in ONE module for DDP (every backbone pass of a step happens inside one wrapped
    forward). ``generator`` drives all of the loss's randomness (t, masks, draws)."""

    def attach(self, model: nn.Module) -> None:
        """Called once by ``experiment`` after the model's initial weights are loaded (a loss that
        needs e.g. a frozen copy of the pretrained model takes it here)."""

    def forward(self, model: nn.Module, batch: Dict[str, torch.Tensor], generator: torch.Generator) -> LossOutput:
        raise NotImplementedError

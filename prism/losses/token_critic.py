"""``losses.token_critic``: train the Token-Critic baseline (Lezama et al. 2023, "Discrete Predictor-
Corrector Diffusion Models for Image Synthesis"; the PRISM paper's Sudoku baseline).

For a data sequence x: t ~ U[eps, 1], z ~ q(z_t | x); the frozen MDM fills EVERY masked position of z
with a draw from its posterior, giving x̂; the critic reads x̂ and is trained with

    L = mean over masked positions i of BCE(1[x̂_i = x_i], critic_i(x̂)),

i.e. to tell real tokens from generated ones. The MDM stays frozen (one gradient-free backbone pass
and one critic pass per step); at sampling time the lowest-scored tokens of x̂ are masked again.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from prism.metrics.calibration import expected_calibration_error
from prism.losses.base import Loss, LossOutput
from prism.masking import LOGLINEAR, NoiseSchedule, mask_tokens, sample_t
from prism.ops import categorical_draw
from registry import LOSSES


def fill_all(model, z: torch.Tensor, attention_mask, t, generator, temperature: float = 1.0, top_p: float = 1.0):
    """x̂: every masked position of z drawn from the model's posterior in one pass
    (``prism.ops.categorical_draw`` at the masked positions only; the others keep z's token)."""
    log_probs = model(z, attention_mask=attention_mask, t=t).log_probs
    masked = z == model.mask_id
    return categorical_draw(log_probs, generator, temperature, top_p, positions=masked, fill=z).to(z.device), log_probs


@LOSSES.register("token_critic")
class TokenCriticLoss(Loss):
    """BCE of ``models.mdm.critic`` on x̂ (all masked positions filled by the frozen MDM), labelled on
    the masked positions. Needs ``experiment.trainable = ['critic.*']``."""

    def __init__(self, temperature: float = 1.0, top_p: float = 1.0, eps: float = 1e-3, antithetic: bool = True,
                 noise: Optional[NoiseSchedule] = None):
        super().__init__()
        self.temperature, self.top_p, self.eps, self.antithetic = temperature, top_p, eps, antithetic
        self.noise = noise or LOGLINEAR

    def attach(self, model) -> None:
        if getattr(model, "critic", None) is None:
            raise ValueError("losses.token_critic needs models.mdm.critic = @models.token_critic()")
        training = sorted({n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad and not n.startswith("critic.")})
        if training:
            raise ValueError(f"the Token-Critic baseline keeps the MDM frozen, but {training} would train: "
                             "set experiment.trainable = ['critic.*']")

    def forward(self, model, batch, generator) -> LossOutput:
        x, fixed = batch["input_ids"], batch["fixed"]
        attention_mask = batch.get("attention_mask")
        t = sample_t(x.shape[0], self.eps, self.antithetic, generator).to(x.device)
        z, masked = mask_tokens(x, t, model.mask_id, fixed, generator, self.noise)
        with torch.no_grad():
            x_hat, _ = fill_all(model, z, attention_mask, t, generator, self.temperature, self.top_p)
        all_logits = model.critic_logits(x_hat, attention_mask)
        logits = all_logits[masked].float()
        target = (x_hat == x)[masked].float()
        if logits.numel():
            loss = F.binary_cross_entropy_with_logits(logits, target)
        else:  # nothing was masked anywhere in the batch: keep the graph, contribute nothing
            loss = all_logits.sum() * 0.0
        with torch.no_grad():
            p = torch.sigmoid(logits)
            nan = torch.tensor(float("nan"))
            logs = {
                "bce": loss.detach(),
                "critic_acc": ((p > 0.5) == target.bool()).float().mean() if p.numel() else nan,
                "fill_acc": target.mean() if p.numel() else nan,
                "critic_ece": torch.tensor(expected_calibration_error(p, target) if p.numel() else float("nan")),
            }
        return LossOutput(loss, logs)

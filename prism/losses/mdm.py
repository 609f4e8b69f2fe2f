"""``losses.mdlm``: MDLM's continuous-time objective (Sahoo et al. 2024, Eq. 10-11).

With the log-linear schedule α_t = 1 − t the NELBO weight α'_t / (1 − α_t) is −1/t, so

    L = E_{t ~ U[eps, 1]} E_{z_t} [ Σ_{i masked} (1/t) · −log p_θ(x_i | z_t) ]

normalised by the number of positions that may be masked (non-fixed, non-padding), i.e. a
per-generated-token NELBO (``normalize='tokens'``), or per sequence as LLaDA's SFT loss is
(``normalize='sequence'``: each row's sum divided by its own count of maskable positions, the answer
with its EOS padding, then the mean over rows; LLaDA GUIDELINES.md: Σ(CE/p_mask)/answer_len / B).
"""
from __future__ import annotations

from typing import Optional

import torch

from prism.losses.base import Loss, LossOutput
from prism.masking import LOGLINEAR, NoiseSchedule, limit_to_window, mask_tokens, sample_t
from registry import LOSSES

NORMALIZE = ("tokens", "sequence")


def corrupt(loss, mask_id: int, batch, generator):
    """The forward process q(z_t | x) of a training batch (MDLM, Sahoo et al. 2024, §3): per sequence
    t ~ U[ε, 1] (antithetic if ``loss.antithetic``), each free position of x masked with probability
    1 − α_t under ``loss.noise``; positions fixed by the batch (a prompt) or beyond
    ``loss.mask_window`` never. Returns (x, fixed, t, z_t, masked)."""
    x = batch["input_ids"]
    fixed = limit_to_window(batch["fixed"], loss.mask_window)
    t = sample_t(x.shape[0], loss.eps, loss.antithetic, generator).to(x.device)
    z, masked = mask_tokens(x, t, mask_id, fixed, generator, loss.noise)
    return x, fixed, t, z, masked


def check_normalize(normalize: str) -> None:
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be one of {NORMALIZE} (per batch token or per sequence), got {normalize!r}")


@LOSSES.register("mdlm")
class MDLMLoss(Loss):
    """MDLM NELBO: t ~ U[eps, 1] (antithetic), mask each non-fixed token w.p. 1 − α_t, CE on masked
    positions weighted −α'_t/(1 − α_t) (= t and 1/t for the default log-linear ``noise``; SUBS
    parameterisation in ``prism.model``). ``normalize``: 'tokens' | 'sequence' (see ``nelbo``);
    ``mask_window``: only the first N non-fixed positions of each row are ever masked (None: all)."""

    def __init__(self, eps: float = 1e-3, antithetic: bool = True, noise: Optional[NoiseSchedule] = None,
                 normalize: str = "tokens", mask_window: Optional[int] = None):
        super().__init__()
        check_normalize(normalize)
        self.eps, self.antithetic, self.normalize, self.mask_window = eps, antithetic, normalize, mask_window
        self.noise = noise or LOGLINEAR

    def forward(self, model, batch, generator) -> LossOutput:
        x, fixed, t, z, masked = corrupt(self, model.mask_id, batch, generator)
        out = model(z, attention_mask=batch.get("attention_mask"), t=t)
        return self.nelbo(out.log_probs, x, masked, fixed, self.noise.weight(t), self.normalize)

    @staticmethod
    def nelbo(log_probs, x, masked, fixed, weight, normalize: str = "tokens") -> LossOutput:
        """The weighted cross-entropy of Eq. 11 given the model's SUBS log-probabilities;
        ``weight`` (B,) is −α'_t / (1 − α_t) (1/t for the log-linear schedule). ``normalize``:
        'tokens' divides the batch's sum by its count of non-fixed positions; 'sequence' divides
        each row's sum by the row's count, then averages the rows (LLaDA's SFT loss)."""
        nll = -log_probs.gather(-1, x[..., None]).squeeze(-1)
        nll = torch.where(masked, nll, torch.zeros_like(nll))
        weighted = nll * weight[:, None]
        n_masked = masked.sum().clamp(min=1)
        if normalize == "sequence":
            loss = (weighted.sum(1) / (~fixed).sum(1).clamp(min=1)).mean()
        else:
            loss = weighted.sum() / (~fixed).sum().clamp(min=1)
        logs = {
            "nelbo": loss.detach(),
            "masked_ce": (nll.sum() / n_masked).detach(),
            "masked_acc": ((log_probs.argmax(-1) == x) & masked).sum().float().div(n_masked).detach(),
        }
        return LossOutput(loss, logs)

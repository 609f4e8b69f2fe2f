"""Measure quality signals directly, without a sampler: mask held-out data as in training, fill
cells from an MDM, and ask how well each signal tells the wrong fills from the right ones.

One draw serves every signal, so all of them are scored on the same (board, position, token):

- z ~ q(z_t | x) with t ~ U[eps, 1] (as in training);
- one pass of the *filler* MDM on z; every masked position gets a float64 Gumbel draw: x̂;
- k masked positions per sequence (uniform) are the scored fills F; y = z with F filled (Algorithm 1);
- signals on F: ``prism`` g_i(y) (the PRISM head reads y, as it was trained), ``token_critic``
  sigmoid(critic_i(x̂)) (the critic reads x̂, as it was trained), ``confidence`` p_θ(x̂_i | z) of the
  filler at fill time (what ReMDM-conf remasks by);
- label 1[x̂_i = x_i].
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from prism.metrics.calibration import auroc, expected_calibration_error, reliability
from prism.losses.prism import choose_fill_positions
from prism.losses.token_critic import fill_all
from prism.masking import LOGLINEAR, mask_tokens, sample_t


@torch.no_grad()
def score_fills(batch: Dict[str, torch.Tensor], filler, generator: torch.Generator, k: int = 4,
                prism_model=None, critic_model=None, eps: float = 1e-3, noise=None) -> Dict[str, torch.Tensor]:
    """Signals and labels on the k scored fills of each sequence (flattened over the batch)."""
    x, fixed = batch["input_ids"], batch["fixed"]
    t = sample_t(x.shape[0], eps, True, generator)
    z, masked = mask_tokens(x, t, filler.mask_id, fixed, generator, noise or LOGLINEAR)
    x_hat, log_probs = fill_all(filler, z, None, t, generator)
    scored = choose_fill_positions("random", k, masked, None, generator)
    y = torch.where(scored, x_hat, z)
    out = {
        "label": (x_hat == x)[scored],
        "confidence": log_probs.gather(-1, x_hat[..., None]).squeeze(-1)[scored].exp(),
        "t": t[:, None].expand_as(x)[scored],
    }
    if prism_model is not None:
        out["prism"] = torch.sigmoid(prism_model(y, t=t).quality_logits.float())[scored]
    if critic_model is not None:
        out["token_critic"] = torch.sigmoid(critic_model.critic_logits(x_hat).float())[scored]
    return out


def summarise(signals: Dict[str, torch.Tensor], n_bins: int = 10) -> Dict[str, Dict[str, float]]:
    """Per signal: AUROC (right vs wrong fills), ECE, mean predicted vs observed accuracy, and the
    reliability bins."""
    label = signals["label"]
    table = {}
    for name, p in signals.items():
        if name in ("label", "t"):
            continue
        table[name] = {
            "auroc": auroc(p, label),
            "ece": expected_calibration_error(p, label, n_bins),
            "mean_pred": float(p.double().mean()),
            "accuracy": float(label.double().mean()),
            "n": int(label.numel()),
            "bins": {k: v.tolist() for k, v in reliability(p, label, n_bins).items()},
        }
    return table


def collect(batches, filler, seed: int = 0, k: int = 4, prism_model=None, critic_model=None,
            limit: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """``score_fills`` over batches (a fixed generator: the same boards, cells and draws for every
    set of models), concatenated."""
    g = torch.Generator().manual_seed(seed)
    parts, seen = [], 0
    for batch in batches:
        if limit is not None and seen >= limit:
            break
        parts.append(score_fills(batch, filler, g, k, prism_model, critic_model))
        seen += len(batch["input_ids"])
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}

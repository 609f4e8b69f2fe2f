"""How good is a quality signal? AUROC for telling wrong tokens from right ones, expected
calibration error (ECE) and reliability bins. Plain torch, float64, no sklearn."""
from __future__ import annotations

from typing import Dict

import torch


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve of ``scores`` for the positive class ``labels == 1``: the probability
    that a random positive scores above a random negative, ties counting one half (the Mann-Whitney
    U statistic with mid-ranks). NaN when a class is empty."""
    s, y = scores.double().flatten(), labels.bool().flatten()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = torch.argsort(s)
    s_sorted = s[order]
    ranks = torch.empty_like(s)
    ranks[order] = torch.arange(1, len(s) + 1, dtype=torch.float64)
    # mid-ranks for ties: every member of a tie group gets the group's mean rank
    _, inverse, counts = torch.unique_consecutive(s_sorted, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    mid = ends - (counts.double() - 1) / 2
    ranks[order] = mid[inverse]
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def reliability(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 10) -> Dict[str, torch.Tensor]:
    """Equal-width bins on [0, 1]: per bin the count, the mean predicted probability and the
    observed frequency of label 1 (NaN for an empty bin)."""
    p, y = probs.double().flatten(), labels.double().flatten()
    idx = (p * n_bins).long().clamp(0, n_bins - 1)
    count = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, torch.ones_like(p))
    conf = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, p) / count
    freq = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, y) / count
    return {"count": count, "confidence": conf, "frequency": freq}


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 10) -> float:
    """ECE = Σ_b (n_b / n) · |mean p in b − frequency of 1 in b| over equal-width bins (Guo et al. 2017)."""
    r = reliability(probs, labels, n_bins)
    n = r["count"].sum()
    if n == 0:
        return float("nan")
    gap = (r["confidence"] - r["frequency"]).abs().nan_to_num(0.0)
    return float((r["count"] / n * gap).sum())

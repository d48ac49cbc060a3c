"""Quality metrics for predictive distributions: NLL, accuracy, expected calibration error, AUROC."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def nll_classification(probs: Tensor, y: Tensor) -> float:
    """Mean negative log-likelihood of integer labels under predicted class probabilities."""
    return float(-torch.log(probs.gather(1, y.view(-1, 1)).clamp_min(1e-12)).mean())


def nll_gaussian(mean: Tensor, variance: Tensor, y: Tensor) -> float:
    """Mean negative log-likelihood of targets under independent Gaussian predictions."""
    y = y.reshape(mean.shape)
    per = 0.5 * (torch.log(2 * math.pi * variance) + (y - mean) ** 2 / variance)
    return float(per.sum(-1).mean())


def accuracy(probs: Tensor, y: Tensor) -> float:
    return float((probs.argmax(-1) == y).to(torch.float64).mean())


def ece(probs: Tensor, y: Tensor, bins: int = 15) -> float:
    """Expected calibration error with equal-width confidence bins."""
    conf, pred = probs.max(-1)
    correct = (pred == y).to(torch.float64)
    conf = conf.to(torch.float64)
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        mask = (conf > lo) & (conf <= hi) if lo > 0 else (conf >= lo) & (conf <= hi)
        if mask.any():
            total += float(mask.to(torch.float64).mean()) * abs(float(conf[mask].mean() - correct[mask].mean()))
    return total


def reliability(probs: Tensor, y: Tensor, bins: int = 15) -> dict[str, list[float]]:
    """Per-bin confidence, accuracy and count for a reliability diagram."""
    conf, pred = probs.max(-1)
    correct = (pred == y).to(torch.float64)
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    out: dict[str, list[float]] = {"lower": [], "upper": [], "confidence": [], "accuracy": [], "count": []}
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        mask = (conf.double() > lo) & (conf.double() <= hi)
        out["lower"].append(float(lo))
        out["upper"].append(float(hi))
        out["count"].append(int(mask.sum()))
        out["confidence"].append(float(conf[mask].mean()) if mask.any() else math.nan)
        out["accuracy"].append(float(correct[mask].mean()) if mask.any() else math.nan)
    return out


def auroc(scores_in: Tensor, scores_out: Tensor) -> float:
    """Area under the ROC curve for telling ``out`` (positives, higher scores) from ``in``; ties count half."""
    s_in = scores_in.reshape(-1).to(torch.float64)
    s_out = scores_out.reshape(-1).to(torch.float64)
    if s_in.numel() == 0 or s_out.numel() == 0:
        raise ValueError("auroc needs scores for both groups.")
    allv = torch.cat([s_in, s_out])
    order = torch.argsort(allv)
    _, inverse, counts = torch.unique_consecutive(allv[order], return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).to(torch.float64)
    ranks = torch.empty_like(allv)
    ranks[order] = ((ends - counts + 1 + ends) / 2)[inverse]  # average 1-based rank over ties
    n_out, n_in = s_out.numel(), s_in.numel()
    r_out = ranks[n_in:].sum()
    return float((r_out - n_out * (n_out + 1) / 2) / (n_out * n_in))

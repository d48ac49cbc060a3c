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


def _binned_ece(conf: Tensor, correct: Tensor, bins: int) -> Tensor:
    """:func:`ece` of each row of ``conf`` / ``correct`` (R, N) at once: (R,) float64."""
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    # the bin of each confidence, as in ece(): (lo, hi], the first bin closed at 0
    index = (torch.searchsorted(edges, conf.contiguous(), right=False) - 1).clamp(0, bins - 1)
    rows, n = conf.shape
    gap = torch.zeros(rows, bins, dtype=torch.float64).scatter_add_(1, index, conf - correct)
    return gap.abs().sum(1) / n if n else torch.zeros(rows, dtype=torch.float64)


def ece_noise(
    probs: Tensor, y: Tensor, reference: Tensor | None = None, bins: int = 15, draws: int = 2000, seed: int = 0
) -> dict[str, float | list[float]]:
    """How much of a binned ECE on a finite test set is sampling noise.

    Returns:
        ``calibrated_floor``: the mean ECE a *perfectly calibrated* predictor with these confidences would show on
        a test set of this size (each prediction drawn correct with probability equal to its confidence): the
        ECE that is noise alone. Predictions spread over more, emptier bins have a higher floor.
        With ``reference`` (another predictor's probabilities on the same inputs), over ``draws`` bootstrap
        resamples of the test set: ``p_below_reference`` (the share of resamples where this ECE is lower than
        the reference's), ``difference_ci95`` (2.5 and 97.5 percentiles of this ECE minus the reference's) and
        ``reference_calibrated_floor``.
    """
    gen = torch.Generator().manual_seed(seed)
    conf, pred = probs.double().max(-1)
    correct = (pred == y).double()

    def floor(c: Tensor) -> float:
        hits = (torch.rand(draws, len(c), dtype=torch.float64, generator=gen) < c).double()
        return float(_binned_ece(c.expand(draws, -1), hits, bins).mean())

    out: dict[str, float | list[float]] = {"calibrated_floor": floor(conf)}
    if reference is not None:
        rconf, rpred = reference.double().max(-1)
        rcorrect = (rpred == y).double()
        pick = torch.randint(0, len(y), (draws, len(y)), generator=gen)
        diff = _binned_ece(conf[pick], correct[pick], bins) - _binned_ece(rconf[pick], rcorrect[pick], bins)
        out["p_below_reference"] = float((diff < 0).double().mean())
        out["difference_ci95"] = [float(v) for v in diff.quantile(torch.tensor([0.025, 0.975], dtype=torch.float64))]
        out["reference_calibrated_floor"] = floor(rconf)
    return out


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

"""Metrics against brute force and hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal

import curvature as cv
from curvature.metrics import reliability

from .cases import DTYPE


def pairwise_auroc(scores_in: torch.Tensor, scores_out: torch.Tensor) -> float:
    """P(score_out > score_in) + ½ P(tie) over every (out, in) pair."""
    total = 0.0
    for o in scores_out.reshape(-1).tolist():
        for i in scores_in.reshape(-1).tolist():
            total += 1.0 if o > i else 0.5 if o == i else 0.0
    return total / (scores_out.numel() * scores_in.numel())


@pytest.mark.parametrize("seed", range(6))
def test_auroc_equals_the_pairwise_count_with_ties(seed):
    gen = torch.Generator().manual_seed(seed)
    n_in, n_out = int(torch.randint(1, 40, (1,), generator=gen)), int(torch.randint(1, 40, (1,), generator=gen))
    levels = [3, 5, 1000][seed % 3]  # few levels: many ties
    s_in = torch.randint(0, levels, (n_in,), generator=gen).to(DTYPE)
    s_out = (torch.randint(0, levels, (n_out,), generator=gen) + (seed % 2)).to(DTYPE)
    assert cv.auroc(s_in, s_out) == pytest.approx(pairwise_auroc(s_in, s_out), abs=1e-12)
    assert cv.auroc(s_in.float(), s_out.float()) == pytest.approx(pairwise_auroc(s_in, s_out), abs=1e-12)


def test_auroc_hand_cases():
    a = torch.tensor([0.1, 0.2, 0.3])
    assert cv.auroc(a, a + 1) == 1.0
    assert cv.auroc(a + 1, a) == 0.0
    assert cv.auroc(torch.ones(4), torch.ones(7)) == 0.5
    # out = [0.2, 0.5] vs in = [0.1, 0.2, 0.3]: 0.2 beats 1, ties 1; 0.5 beats 3 → (1 + 0.5 + 3) / 6
    assert cv.auroc(a, torch.tensor([0.2, 0.5])) == pytest.approx(4.5 / 6, abs=1e-15)
    assert cv.auroc(a.reshape(3, 1), torch.tensor([[0.5]])) == 1.0
    with pytest.raises(ValueError):
        cv.auroc(a, torch.tensor([]))


def test_ece_hand_computed():
    """Five equal-width bins. Confidences 0.9 (right), 0.78 (wrong), 0.7 (right), 0.55 (right):
    bin (0.8, 1]: ¼·|0.9 − 1|; bin (0.6, 0.8]: ½·|0.74 − 0.5|; bin (0.4, 0.6]: ¼·|0.55 − 1| → 0.2575."""
    probs = torch.tensor([[0.9, 0.1], [0.78, 0.22], [0.3, 0.7], [0.55, 0.45]], dtype=DTYPE)
    y = torch.tensor([0, 1, 1, 0])
    assert cv.ece(probs, y, bins=5) == pytest.approx(0.25 * 0.1 + 0.5 * 0.24 + 0.25 * 0.45, abs=1e-14)
    assert cv.ece(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1])) == 0.0
    assert cv.ece(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([1, 0])) == 1.0


def test_ece_matches_reliability_bins_and_an_index_based_reference():
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(500, 4, generator=gen, dtype=DTYPE), -1)
    y = torch.randint(0, 4, (500,), generator=gen)
    bins = 15
    conf, pred = probs.max(-1)
    correct = (pred == y).to(DTYPE)
    index = torch.ceil(conf * bins).long().clamp(1, bins) - 1  # bin k holds (k/bins, (k+1)/bins]
    ref = 0.0
    for k in range(bins):
        m = index == k
        if m.any():
            ref += float(m.to(DTYPE).mean()) * abs(float(conf[m].mean() - correct[m].mean()))
    assert cv.ece(probs, y, bins) == pytest.approx(ref, abs=1e-12)
    rel = reliability(probs, y, bins)
    assert sum(rel["count"]) == 500
    from_bins = sum(
        c / 500 * abs(cf - acc)
        for c, cf, acc in zip(rel["count"], rel["confidence"], rel["accuracy"], strict=True)
        if c > 0
    )
    assert cv.ece(probs, y, bins) == pytest.approx(from_bins, abs=1e-12)


def test_nll_and_accuracy_hand_computed():
    probs = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]], dtype=DTYPE)
    y = torch.tensor([0, 2])
    assert cv.nll_classification(probs, y) == pytest.approx(-(math.log(0.5) + math.log(0.1)) / 2, abs=1e-14)
    assert cv.accuracy(probs, y) == 0.5
    gen = torch.Generator().manual_seed(1)
    mean = torch.randn(6, 2, generator=gen, dtype=DTYPE)
    var = torch.rand(6, 2, generator=gen, dtype=DTYPE) + 0.1
    target = torch.randn(6, 2, generator=gen, dtype=DTYPE)
    expected = -Normal(mean, var.sqrt()).log_prob(target).sum(-1).mean()
    assert cv.nll_gaussian(mean, var, target) == pytest.approx(float(expected), abs=1e-13)


def test_ece_noise_floor_of_a_calibrated_predictor_matches_the_binomial_expectation():
    """Four predictions at confidence ½, one bin: the ECE of a calibrated predictor is |k/4 − ½| with
    k ~ Binomial(4, ½), whose mean is 2·(½·1/16 + ¼·4/16) = 0.1875; all-certain predictions have no noise."""
    probs = torch.full((4, 2), 0.5, dtype=DTYPE)
    y = torch.zeros(4, dtype=torch.long)
    noise = cv.metrics.ece_noise(probs, y, draws=20000)
    assert noise["calibrated_floor"] == pytest.approx(0.1875, abs=0.005)
    certain = torch.tensor([[1.0, 0.0]] * 6, dtype=DTYPE)
    assert cv.metrics.ece_noise(certain, torch.tensor([0, 1, 0, 1, 0, 1]))["calibrated_floor"] == 0.0


def test_ece_noise_bootstrap_compares_on_the_same_resamples():
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(300, 4, generator=gen, dtype=DTYPE), -1)
    y = torch.randint(0, 4, (300,), generator=gen)
    same = cv.metrics.ece_noise(probs, y, probs, draws=500)
    assert same["p_below_reference"] == 0.0 and same["difference_ci95"] == [0.0, 0.0]
    # A calibrated predictor against an overconfident one, on outcomes drawn from the calibrated confidences.
    p = 0.5 + 0.5 * torch.rand(2000, generator=gen, dtype=DTYPE)
    y2 = (torch.rand(2000, generator=gen, dtype=DTYPE) >= p).long()  # class 0 with probability p
    calibrated = torch.stack([p, 1 - p], -1)
    over = torch.stack([(p + 0.2).clamp_max(1.0), 1 - (p + 0.2).clamp_max(1.0)], -1)
    cmp = cv.metrics.ece_noise(calibrated, y2, over, draws=500)
    assert cmp["p_below_reference"] == 1.0
    assert cmp["difference_ci95"][1] < -0.05
    # the overconfident predictor puts 40 % of its predictions at confidence 1, where a calibrated one is never wrong
    assert 0 < cmp["reference_calibrated_floor"] < cmp["calibrated_floor"]

"""Inputs far outside the training range are flagged, answered with finite numbers, and never raise.

The service maps exceptions to HTTP 500 and serialises every returned tensor, so ``post.predict`` must return
finite values for inputs scaled by 1e3 … 1e38, inputs whose forward pass overflows or produces NaN
(``inf − inf``), and non-finite inputs, for both predictives, classification and regression.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import curvature as cv

SCALES = (1e3, 1e10, 1e20, 1e30, 1e38)


def _extreme_batch(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``x`` (in range) followed by scaled, overflowing, NaN-producing and non-finite rows."""
    base = x[:1]
    rows = [base * s for s in SCALES] + [-base * 1e38]
    mixed = base.clone().flatten()
    mixed[0], mixed[1] = math.inf, -math.inf  # inf − inf inside the first layer: NaN
    rows += [mixed.reshape(base.shape), torch.full_like(base, math.nan), torch.full_like(base, math.inf)]
    nan_one = base.clone().flatten()
    nan_one[-1] = math.nan
    rows.append(nan_one.reshape(base.shape))
    extreme = torch.cat(rows)
    return torch.cat([x, extreme]), len(extreme)


def _blob_data(n: int, seed: int, d: int = 6, classes: int = 3):
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=gen)
    centres = 2.0 * torch.eye(classes, d)
    return centres[y] + torch.randn(n, d, generator=gen), y


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        loss(model(x), y).backward()
        opt.step()
    return model.eval()


def _classifier(kind: str):
    torch.manual_seed(0)
    if kind == "cnn":
        model = nn.Sequential(
            nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 3)
        )
        x, y = _blob_data(400, 0, d=36)
        x = x.reshape(-1, 1, 6, 6)
    else:
        act = nn.ReLU if kind == "relu_mlp" else nn.Tanh
        model = nn.Sequential(nn.Linear(6, 16), act(), nn.Linear(16, 16), act(), nn.Linear(16, 3))
        x, y = _blob_data(400, 0)
    return _train(model, x[:300], y[:300], nn.functional.cross_entropy), x, y


def _check(out: dict, n_normal: int, n_extreme: int) -> None:
    for key, value in out.items():
        if value.dtype.is_floating_point:
            assert bool(torch.isfinite(value).all()), f"{key} is not finite: {value}"
    assert bool(out["ood"][n_normal:].all()), out["ood"][n_normal:]
    assert not bool(out["ood"][:n_normal].all())
    assert not bool(out["fallback"][:n_normal].any())
    if "probs" in out:
        assert torch.allclose(out["probs"].sum(-1).double(), torch.ones(len(out["probs"]), dtype=torch.float64))


@pytest.mark.parametrize("kind", ["relu_mlp", "tanh_mlp", "cnn"])
@pytest.mark.parametrize("predictive", ["glm", "mc"])
def test_extreme_inputs_are_flagged_finite_and_never_raise(kind, predictive):
    model, x, y = _classifier(kind)
    post = cv.fit_laplace(
        model, x[:300], y[:300], x[300:], y[300:], cv.LaplaceConfig(samples=16, predictive=predictive)
    )
    batch, n_extreme = _extreme_batch(x[300:340])
    for score in ("entropy", "mutual_information", "max_prob"):
        out = post.predict(batch, samples=16, ood_score=score)
        _check(out, 40, n_extreme)
        # flagged rows carry the score's largest value: uniform probabilities
        top = 1 - 1 / 3 if score == "max_prob" else math.log(3)
        assert torch.allclose(out["ood_score"][40:].double(), torch.full((n_extreme,), top, dtype=torch.float64))
    # the same inputs one at a time (the service micro-batches): same answers, still no exception
    alone = post.predict(batch[40:41], samples=16)
    assert bool(alone["ood"].all()) and bool(torch.isfinite(alone["entropy"]).all())


def test_huge_logit_covariances_do_not_break_the_linearised_predictive():
    """Scaled by 1e15 the logits stay finite in float32 but their covariance (≈ 1e30) defeats an unscaled
    Cholesky factorisation; the probabilities must still be finite and sum to one."""
    model, x, y = _classifier("relu_mlp")
    post = cv.fit_laplace(model, x[:300], y[:300], x[300:], y[300:], cv.LaplaceConfig(samples=16))
    post.metadata.pop("input_norm_max")  # no range guard: the predictive itself must cope
    for scale in (1e6, 1e12, 1e15, 1e18):
        out = post.predict(x[300:310] * scale, samples=16)
        assert bool(torch.isfinite(out["probs"]).all()) and bool(torch.isfinite(out["mutual_information"]).all())
        assert torch.allclose(out["probs"].sum(-1), torch.ones(10), atol=1e-5)


def test_regression_extreme_inputs_are_finite_and_flagged():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(300, 2, generator=gen) * 4 - 2
    y = (x[:, :1] ** 3) + 0.1 * torch.randn(300, 1, generator=gen)
    model = _train(
        nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 1)), x[:200], y[:200], nn.functional.mse_loss
    )
    cfg = cv.LaplaceConfig(likelihood="regression", samples=16, ood_score="entropy")
    for predictive in ("glm", "mc"):
        post = cv.fit_laplace(
            model, x[:200], y[:200], x[200:], y[200:], cv.LaplaceConfig(**{**cfg.to_dict(), "predictive": predictive})
        )
        batch, n_extreme = _extreme_batch(x[200:230])
        out = post.predict(batch, samples=16)
        _check(out, 30, n_extreme)


def test_out_of_range_uses_the_training_inputs_norm():
    model, x, y = _classifier("relu_mlp")
    post = cv.fit_laplace(model, x[:300], y[:300], x[300:], y[300:], cv.LaplaceConfig(samples=16))
    limit = post.metadata["input_norm_max"]
    assert limit == pytest.approx(float(x.norm(dim=1).max()), rel=1e-6)
    direction = x[300:301] / x[300:301].norm()
    inside = post.predict(direction * 0.99 * cv.predictive.INPUT_RANGE_FACTOR * limit, samples=8)
    outside = post.predict(direction * 1.01 * cv.predictive.INPUT_RANGE_FACTOR * limit, samples=8)
    assert not bool(inside["out_of_range"].any()) and bool(outside["out_of_range"].all())
    assert bool(outside["ood"].all())

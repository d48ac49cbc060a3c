"""Shard factors merge into the full-data factors; a fit finished from merged factors equals the one-pass fit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvature as cv


def _net_and_data(n: int = 300) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(n, 6, dtype=torch.float64)
    return net, x, torch.randint(0, 3, (n,))


@pytest.mark.parametrize("method", ["kflr", "diag"])
def test_shards_merge_into_the_full_data_factors(method: str) -> None:
    net, x, y = _net_and_data()
    lik = cv.CrossEntropy()

    def fit(xs: torch.Tensor, ys: torch.Tensor):
        if method == "diag":
            return cv.fit_diagonal(net, (xs, ys), lik, batch_size=64)
        return cv.fit_kronecker(net, (xs, ys), lik, method=method, batch_size=64)

    full = fit(x, y)
    bounds = [0, 70, 71, 200, 300]  # uneven shards, one of a single example
    merged = cv.merge_factors(fit(x[a:b], y[a:b]) for a, b in zip(bounds, bounds[1:], strict=False))
    assert merged.n_data == full.n_data == 300 and merged.method == full.method
    for name in full:
        got, want = merged[name], full[name]
        pairs = [(got, want)] if method == "diag" else [(got.A, want.A), (got.G, want.G)]
        for g, w in pairs:
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)


def test_merge_refuses_kfra_and_mixed_parts() -> None:
    net, x, y = _net_and_data(40)
    lik = cv.CrossEntropy()
    kfra = cv.fit_kronecker(net, (x, y), lik, method="kfra")
    with pytest.raises(ValueError, match="KFRA"):
        cv.merge_factors([kfra, kfra])
    with pytest.raises(ValueError, match="one kind"):
        cv.merge_factors([cv.fit_kronecker(net, (x, y), lik, method="kflr"), cv.fit_diagonal(net, (x, y), lik)])
    with pytest.raises(ValueError):
        cv.merge_factors([])


def test_fit_laplace_from_merged_factors_equals_the_one_pass_fit() -> None:
    net, x, y = _net_and_data()
    x_val, y_val = x[:60] + 0.1, y[:60]
    config = cv.LaplaceConfig(curvature="kflr", tuning="validation", samples=8)
    one_pass = cv.fit_laplace(net, x, y, x_val, y_val, config)
    parts = [cv.fit_kronecker(net, (x[a : a + 100], y[a : a + 100]), cv.CrossEntropy(), "kflr") for a in (0, 100, 200)]
    sharded = cv.fit_laplace(net, x, y, x_val, y_val, config, factors=cv.merge_factors(parts))
    assert sharded.n_eff == pytest.approx(one_pass.n_eff, rel=1e-9)
    for predictive, table in one_pass.ood_table.items():
        assert sharded.ood_table[predictive] == pytest.approx(table, rel=1e-6)
    a = one_pass.predict(x[:20], predictive="glm")
    b = sharded.predict(x[:20], predictive="glm")
    torch.testing.assert_close(b["probs"], a["probs"], rtol=1e-8, atol=1e-10)
    with pytest.raises(ValueError, match="do not match"):
        cv.fit_laplace(net, x, y, x_val, y_val, cv.LaplaceConfig(curvature="kfac"), factors=parts[0])

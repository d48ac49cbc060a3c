"""A saved posterior is bound to its header, its model's layers and its predictive's OOD thresholds."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import curvature as cv


def _fit(predictive: str = "glm") -> tuple[nn.Module, cv.LaplacePosterior, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.randn(120, 6)
    y = torch.randint(0, 3, (120,))
    cfg = cv.LaplaceConfig(curvature="kflr", tuning="none", predictive=predictive, samples=16)
    post = cv.fit_laplace(model, x[:80], y[:80], x[80:], y[80:], cfg)
    return model, post, x[80:]


def _rewrite_header(blob: bytes, edit) -> bytes:
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n])
    meta = json.loads(header["__metadata__"]["kronlap"])
    edit(meta)
    header["__metadata__"]["kronlap"] = json.dumps(meta)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + blob[8 + n :]


def test_edited_header_is_refused():
    model, post, _ = _fit()
    blob = post.to_bytes()
    assert cv.LaplacePosterior.from_bytes(_rewrite_header(blob, lambda m: None), model).n_eff == post.n_eff

    def triple_n_eff(meta):
        meta["n_eff"] = meta["n_eff"] * 3

    with pytest.raises(ValueError, match="digest"):
        cv.LaplacePosterior.from_bytes(_rewrite_header(blob, triple_n_eff), model)


def test_model_with_an_extra_trainable_layer_is_refused():
    model, post, _ = _fit()
    bigger = nn.Sequential(*model, nn.Tanh(), nn.Linear(3, 3))
    with pytest.raises(ValueError, match="layers"):
        cv.LaplacePosterior.from_bytes(post.to_bytes(), bigger)


def test_weights_must_match_exactly():
    model, post, _ = _fit()
    blob = post.to_bytes()
    with torch.no_grad():
        model[0].weight[0, 0] += 1e-6
    with pytest.raises(ValueError, match="does not match"):
        cv.LaplacePosterior.from_bytes(blob, model)


@pytest.mark.parametrize("configured", ["mc", "glm"])
def test_thresholds_are_kept_per_predictive(configured):
    model, post, x_val = _fit(configured)
    assert set(post.ood_table) == {"mc", "glm"}
    for predictive in ("mc", "glm"):
        out = post.predict(x_val, samples=16, predictive=predictive)
        assert float(out["ood_threshold"]) == post.ood_threshold(post.metadata["ood_score"], predictive)
        # calibrated on these very inputs at the 95 % quantile
        assert 0.0 < float(out["ood"].float().mean()) <= 0.1
    default = post.predict(x_val, samples=16)
    assert float(default["ood_threshold"]) == post.ood_threshold(post.metadata["ood_score"], configured)
    assert post.ood_table["mc"] != post.ood_table["glm"]

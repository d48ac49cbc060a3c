"""The blocked Gram product used for the factors, and the reduced-rank softmax square root."""

from __future__ import annotations

import pytest
import torch

import curvature as cv
from curvature.estimators.common import gram


@pytest.mark.parametrize("d", [7, 512, 513, 1000, 1025])
def test_gram_equals_full_product(d):
    x = torch.randn(60, d, dtype=torch.float64, generator=torch.Generator().manual_seed(d))
    out = gram(x, block=256)
    torch.testing.assert_close(out, x.T @ x, rtol=1e-12, atol=1e-12)


def test_softmax_square_root_has_rank_c_minus_one_columns():
    f = torch.randn(20, 10, dtype=torch.float64) * 5
    f[0, -1] = 40.0  # last class almost certain: the reflection must stay well conditioned
    s = cv.CrossEntropy().hessian_sqrt(f)
    p = torch.softmax(f, -1)
    assert s.shape == (20, 10, 9)
    torch.testing.assert_close(
        s @ s.transpose(1, 2), torch.diag_embed(p) - p[:, :, None] * p[:, None, :], rtol=0, atol=1e-14
    )

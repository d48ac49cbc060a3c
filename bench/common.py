"""Shared pieces of the benchmarks: the benchmark network, timing helpers and report writing.

The benchmark network is the 784-1024-1024-10 ReLU MLP of the README's benchmark table, trained with Adam on the 4,000
MNIST-5k training digits. Training takes a few seconds, and every benchmark must see the same weights, so the
trained parameters are cached as safetensors under ``bench/cache/`` keyed by architecture, seed and recipe.
"""

from __future__ import annotations

import copy
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from curvature.data import Split, Splits, mnist5k

BENCH_DIR = Path(__file__).resolve().parent
CACHE_DIR = BENCH_DIR / "cache"
RESULTS_DIR = BENCH_DIR / "results"

MLP_WIDTHS: tuple[int, ...] = (784, 1024, 1024, 10)


@dataclass(frozen=True)
class TrainRecipe:
    """How the benchmark MLP is trained; every field is part of the cache key."""

    seed: int = 0
    epochs: int = 5
    batch_size: int = 128
    lr: float = 1e-3

    def key(self, widths: tuple[int, ...]) -> str:
        arch = "-".join(str(w) for w in widths)
        return f"mnist5k_mlp-{arch}-relu_seed{self.seed}_e{self.epochs}_b{self.batch_size}_lr{self.lr:g}"


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """``None`` picks CUDA when available; asking for CUDA without it is an error."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but torch.cuda.is_available() is False")
    return device


def describe_device(device: torch.device) -> str:
    """A human-readable name of the device the timings ran on."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def synchronize(device: torch.device | str | None = None) -> None:
    """Waits for queued CUDA work, so that wall-clock timings measure the work itself."""
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize(device)


def mlp(widths: tuple[int, ...] = MLP_WIDTHS) -> nn.Sequential:
    """``Linear → ReLU → … → Linear`` with the given layer widths (logits out, no softmax)."""
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(fan_in, fan_out))
    return nn.Sequential(*layers)


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1024) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``."""
    correct = 0
    for start in range(0, len(x), batch_size):
        logits = model(x[start : start + batch_size])
        correct += int((logits.argmax(-1) == y[start : start + batch_size]).sum())
    return correct / len(x)


def _train(model: nn.Module, x: Tensor, y: Tensor, recipe: TrainRecipe) -> None:
    generator = torch.Generator(device="cpu").manual_seed(recipe.seed + 1)
    optimiser = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(recipe.epochs):
        order = torch.randperm(len(x), generator=generator).to(x.device)
        for start in range(0, len(x), recipe.batch_size):
            idx = order[start : start + recipe.batch_size]
            optimiser.zero_grad(set_to_none=True)
            loss_fn(model(x[idx]), y[idx]).backward()
            optimiser.step()
    model.eval()


def load_mnist_mlp(
    device: torch.device | str | None = None,
    recipe: TrainRecipe | None = None,
    widths: tuple[int, ...] = MLP_WIDTHS,
    verbose: bool = True,
) -> tuple[nn.Sequential, Splits]:
    """The trained benchmark MLP and the MNIST-5k splits it was trained on, both on ``device``.

    Trains on first use (Adam, batch 128, five epochs: 98.6% train and 93.4% test accuracy at seed 0) and caches
    the weights under ``bench/cache/``; later calls load them.

    Returns:
        ``(model, splits)``: the model in eval mode, and ``mnist5k(seed, flat=True)`` moved to ``device``.
    """
    recipe = recipe or TrainRecipe()
    device = resolve_device(device)
    raw = mnist5k(seed=recipe.seed, flat=True)
    splits = Splits(
        *(Split(s.x.to(device), s.y.to(device)) for s in (raw.train, raw.val, raw.test)),
        classes=raw.classes,
        image_shape=raw.image_shape,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model = mlp(widths)
    path = CACHE_DIR / f"{recipe.key(widths)}.safetensors"
    if path.exists():
        model.load_state_dict(load_file(path))
        model.to(device).eval()
        return model, splits

    model.to(device)
    start = time.perf_counter()
    _train(model, splits.train.x, splits.train.y, recipe)
    seconds = time.perf_counter() - start
    train_acc = accuracy(model, splits.train.x, splits.train.y)
    test_acc = accuracy(model, splits.test.x, splits.test.y)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    metadata = {k: str(v) for k, v in asdict(recipe).items()}
    metadata.update(widths=str(list(widths)), train_acc=f"{train_acc:.4f}", test_acc=f"{test_acc:.4f}")
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(state, path, metadata=metadata)
    if verbose:
        print(
            f"[bench] trained {recipe.key(widths)} in {seconds:.1f} s: "
            f"train acc {train_acc:.4f}, test acc {test_acc:.4f} -> {path}",
            file=sys.stderr,
        )
    return model, splits


def timeit(fn: Callable[[], Any], repeat: int = 3, warmup: int = 1, device: torch.device | None = None) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeat`` runs, after ``warmup`` untimed runs.

    CUDA is synchronised around every run (when available, or when ``device`` is a CUDA device).
    """
    if repeat < 1:
        raise ValueError(f"repeat must be at least 1, got {repeat}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def training_epoch(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 128) -> Callable[[], None]:
    """A callable running one training epoch (shuffle, forward, backward, Adam step) over ``(x, y)``.

    It trains a copy, so ``model`` keeps its weights.
    """
    trainee = copy.deepcopy(model).train()
    optimiser = torch.optim.Adam(trainee.parameters(), lr=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator(device="cpu").manual_seed(0)

    def epoch() -> None:
        order = torch.randperm(len(x), generator=generator).to(x.device)
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            optimiser.zero_grad(set_to_none=True)
            loss_fn(trainee(x[idx]), y[idx]).backward()
            optimiser.step()

    return epoch


def time_epoch(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 128, repeat: int = 3) -> float:
    """Seconds of one training epoch over ``(x, y)`` (see :func:`training_epoch`); ``model`` is unchanged.

    One warm-up epoch, then the median of ``repeat``.
    """
    return timeit(training_epoch(model, x, y, batch_size), repeat=repeat, warmup=1, device=x.device)


def write_report(name: str, payload: dict, markdown: str) -> tuple[Path, Path]:
    """Writes ``bench/results/NAME.json`` and ``bench/results/NAME.md``; returns both paths."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    json_path = RESULTS_DIR / f"{name}.json"
    md_path = RESULTS_DIR / f"{name}.md"
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    md_path.write_text(markdown.rstrip("\n") + "\n")
    return json_path, md_path

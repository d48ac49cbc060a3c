"""Kronecker-factor fit time of the benchmark MLP, in units of one training epoch (the README's benchmark table, first row).

Usage: ``python -m bench.fit [--device cuda] [--repeat 3] [--batch-size 512]``

Times, over the 4,000 MNIST-5k training points and the 784-1024-1024-10 MLP of :mod:`bench.common`:

* ours: ``fit_kronecker`` with ``kfac`` (one Monte-Carlo sample), ``kflr`` and ``kfra``, and ``fit_diagonal``
  with ``ggn`` (``diag``);
* laplace-torch, when it imports: ``Laplace(model, "classification", subset_of_weights="all",
  hessian_structure="kron").fit(loader)`` with its default backend, ``CurvlinopsGGN`` (exact GGN, i.e. KFLR
  factors; ``laplace_torch_kflr``), and with ``CurvlinopsGGN(stochastic=True)`` (one Monte-Carlo sample per
  point, i.e. KFAC factors; ``laplace_torch_kfac``). Its ``fit`` also eigendecomposes the factors; that part is
  timed separately and reported as ``decompose_seconds``.

The methods and one training epoch (forward, backward and Adam step over the same 4,000 points at batch 128)
run round-robin: one warm-up round, then ``--repeat`` timed rounds; each ``fit_over_epoch`` is the median fit
time over the median epoch time. Also records how closely our KFLR factors
agree with laplace-torch's.

``end_to_end``: the whole fit a user waits for, ``curvature.fit_laplace`` (curvature, eigendecomposition,
validation tuning on the 500 validation digits, OOD calibration), for ``LaplaceConfig()`` (``default``: what
``POST /v1/models/{id}/fits`` does with no options) and for every curvature × predictive
(``CURVATURE_PREDICTIVE``), each divided by one training epoch. Each fit alternates with a timed epoch; a fit's
ratio is its time over the mean of the epochs just before and after it (the load on a shared machine drifts
within a run), and ``over_epoch`` is the median ratio over ``--repeat`` runs of the default, one of every other
option. The fit's own phase timings (``post.metadata["timings"]``) are recorded
beside each. Writes ``bench/results/fit.json`` and ``bench/results/fit.md``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import curvature as cv
from bench.common import describe_device, load_mnist_mlp, resolve_device, synchronize, training_epoch, write_report

BARS: dict[str, float] = {"kfac": 2.0, "kflr": 4.0, "kfra": 2.0}
E2E_BARS: dict[str, float] = {"default": 3.0, "any": 10.0}


def log(message: str) -> None:
    print(f"[bench.fit] {message}", file=sys.stderr, flush=True)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Wall-clock seconds of one call of ``fn`` (CUDA synchronised) and its result."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def laplace_torch_fitters(
    model: nn.Module, loader: DataLoader
) -> dict[str, tuple[Callable[[], Any], Callable[[Any], Any]]]:
    """laplace-torch's two Kronecker fits, as ``name -> (fit, decompose)``; empty when it does not import."""
    try:
        from laplace import Laplace
        from laplace.curvature import CurvlinopsGGN
    except Exception as err:  # any import failure just means the rival is not measured
        log(f"laplace-torch not importable ({type(err).__name__}: {err}); run `make bench-deps`")
        return {}

    def fitter(**kwargs: Any) -> Callable[[], Any]:
        def fit() -> Any:
            la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron", **kwargs)
            la.fit(loader)
            return la

        return fit

    def decompose(la: Any) -> Any:
        return la.H_facs.decompose(damping=la.damping)

    return {
        "laplace_torch_kflr": (fitter(), decompose),
        "laplace_torch_kfac": (fitter(backend=CurvlinopsGGN, backend_kwargs={"stochastic": True}), decompose),
    }


def _rel(a: Tensor, b: Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / a.norm())


def _kron_rel(g: Tensor, a: Tensor, h: Tensor, b: Tensor) -> float:
    """``‖G⊗A − H⊗B‖_F / ‖G⊗A‖_F`` without forming either product.

    Uses ``‖X⊗Y‖_F = ‖X‖_F‖Y‖_F`` and ``⟨X⊗Y, U⊗V⟩ = ⟨X,U⟩⟨Y,V⟩``.
    """
    g, a, h, b = g.double(), a.double(), h.double(), b.double()
    ours = (g * g).sum() * (a * a).sum()
    theirs = (h * h).sum() * (b * b).sum()
    cross = (g * h).sum() * (a * b).sum()
    return float((ours + theirs - 2 * cross).clamp_min(0).sqrt() / ours.sqrt())


def agreement(factors: cv.KroneckerFactors, la: Any) -> dict[str, Any]:
    """How closely our factors match a fitted laplace-torch ``KronLaplace``, layer by layer.

    laplace-torch (curvlinops backend) keeps, per Linear layer, ``[H, B]`` for the weight and ``[H]`` for the
    bias, with ``H = Σ_n g gᵀ`` (summed over the data) and ``B = E[a aᵀ]`` (no bias row). In our convention the
    layer block is ``N·(G ⊗ A)`` with ``A`` including the bias last, so the shared blocks are
    ``weight: N·G ⊗ A[:-1, :-1] ↔ H ⊗ B`` and ``bias: N·G·A[-1, -1] = N·G ↔ H`` (``A[-1, -1] = 1``). The
    weight-bias cross terms are not represented by laplace-torch and are not compared.
    """
    n = factors.n_data
    kfacs = [[f.detach() for f in pair] for pair in la.H_facs.kfacs]
    layers: dict[str, Any] = {}
    i = 0
    for name, lf in factors.items():
        h, b = kfacs[i]
        (h_bias,) = kfacs[i + 1]
        i += 2
        g = n * lf.G.detach().to(h.device)
        a = lf.A.detach().to(b.device)
        layers[name] = {
            "weight_block": _kron_rel(g, a[:-1, :-1], h, b),
            "bias_block": _rel(g * a[-1, -1], h_bias),
            "A": _rel(a[:-1, :-1], b),
            "G": _rel(g, h),
        }
    if i != len(kfacs):
        raise ValueError(f"laplace-torch has {len(kfacs)} Kronecker blocks, we matched {i}")
    return {
        "max_block_rel_diff": max(max(v["weight_block"], v["bias_block"]) for v in layers.values()),
        "layers": layers,
    }


def end_to_end(model: nn.Module, splits, repeat: int, device: torch.device) -> dict[str, Any]:
    """``fit_laplace`` seconds ÷ one training epoch, for the default configuration and each curvature × predictive."""
    x, y, xv, yv = splits.train.x, splits.train.y, splits.val.x, splits.val.y
    epoch = training_epoch(model, x, y, batch_size=128)
    configs: list[tuple[str, cv.LaplaceConfig]] = [("default", cv.LaplaceConfig())] * repeat
    for curvature in cv.Curvature:
        if curvature == "rp":
            continue
        for predictive in cv.Predictive:
            configs.append((f"{curvature}_{predictive}", cv.LaplaceConfig(curvature=curvature, predictive=predictive)))
    epochs, fits, phases = [], {}, {}
    timed(epoch, device)  # warm-up
    cv.fit_laplace(model, x, y, xv, yv, cv.LaplaceConfig())  # warm-up
    for name, config in configs:
        epochs.append(timed(epoch, device)[0])
        seconds, post = timed(lambda config=config: cv.fit_laplace(model, x, y, xv, yv, config), device)
        fits.setdefault(name, []).append(seconds)
        phases[name] = post.metadata["timings"]
        log(f"end to end {name}: {seconds:.2f} s (epoch {epochs[-1]:.3f} s) {phases[name]}")
    epochs.append(timed(epoch, device)[0])
    epoch_seconds = statistics.median(epochs)
    # Each fit is divided by the mean of the epochs timed just before and just after it: on a shared machine the
    # load drifts over a run, and only neighbouring timings saw the same load.
    ratios: dict[str, list[float]] = {}
    for i, (name, _) in enumerate(configs):
        k = sum(1 for n, _ in configs[:i] if n == name)
        ratios.setdefault(name, []).append(fits[name][k] / (0.5 * (epochs[i] + epochs[i + 1])))
    out: dict[str, Any] = {}
    for name, values in fits.items():
        out[name] = {
            "seconds": statistics.median(values),
            "over_epoch": statistics.median(ratios[name]),
            "neighbour_epochs": [0.5 * (epochs[i] + epochs[i + 1]) for i, (n, _) in enumerate(configs) if n == name],
            "phases": phases[name],
        }
    return {"epoch_seconds": epoch_seconds, "epochs": epochs, "fits": out}


def markdown(payload: dict[str, Any]) -> str:
    lines = [
        "# Kronecker fit time ÷ one training epoch",
        "",
        f"784-1024-1024-10 ReLU MLP, {payload['n_data']:,} MNIST-5k points, fit batch {payload['batch_size']}; "
        f"{payload['device_name']} (`{payload['device']}`), torch {payload['torch']}"
        + (f", laplace-torch {payload['laplace_torch']}" if payload.get("laplace_torch") else "")
        + f". Medians of {payload['repeat']} round-robin rounds after a warm-up round; one epoch (batch 128, Adam) = "
        f"{payload['epoch_seconds']:.3f} s. 1-minute load average {payload['load_average']['start']:.1f} at start, "
        f"{payload['load_average']['end']:.1f} at end, on {payload['load_average']['cpu_count']} cores.",
        "",
        "| method | fit (s) | fit ÷ epoch | bar |",
        "|---|---:|---:|---:|",
    ]
    for name, m in payload["methods"].items():
        bar = f"≤ {BARS[name]:g}" if name in BARS else ""
        extra = f" (incl. eigendecomposition {m['decompose_seconds']:.2f} s)" if "decompose_seconds" in m else ""
        lines.append(f"| {name} | {m['fit_seconds']:.3f}{extra} | {m['fit_over_epoch']:.2f} | {bar} |")
    agree = payload.get("agreement")
    if agree:
        lines += ["", "Agreement with laplace-torch (relative Frobenius difference of the shared blocks):", ""]
        lines += ["| comparison | layer | weight block | bias block | A | G |", "|---|---|---:|---:|---:|---:|"]
        for key, result in agree.items():
            for layer, v in result["layers"].items():
                lines.append(
                    f"| {key} | {layer} | {v['weight_block']:.2e} | {v['bias_block']:.2e} "
                    f"| {v['A']:.2e} | {v['G']:.2e} |"
                )
        lines += [
            "",
            "kflr is exact on both sides (float32 round-off only); kfac compares two independent "
            "one-sample Monte-Carlo estimates, so it shows sampling noise.",
        ]
    e2e = payload.get("end_to_end")
    if e2e:
        lines += [
            "",
            "## End to end: `fit_laplace` ÷ one training epoch",
            "",
            f"Curvature, eigendecomposition, validation tuning (500 digits) and OOD calibration; each fit alternates "
            f"with a timed epoch, and is divided by the mean of its two neighbouring epochs (median epoch "
            f"{payload['end_to_end_epoch_seconds']:.3f} s). Bars: default ≤ "
            f"{E2E_BARS['default']:g}, every curvature × predictive ≤ {E2E_BARS['any']:g}.",
            "",
            "| configuration | seconds | ÷ epoch | bar | curvature | posterior | features | tuning | OOD calibration |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, m in e2e.items():
            bar = E2E_BARS["default"] if name == "default" else E2E_BARS["any"]
            ph = m.get("phases", {})
            cells = " | ".join(
                f"{ph[k]:.2f}" if k in ph else ""
                for k in ("curvature", "posterior", "features", "tuning", "ood_calibration")
            )
            lines.append(f"| {name} | {m['seconds']:.2f} | {m['over_epoch']:.2f} | ≤ {bar:g} | {cells} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Time Kronecker-factor fits against one training epoch.")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--repeat", type=int, default=3, help="timed rounds (medians are reported)")
    parser.add_argument("--batch-size", type=int, default=512, help="fit batch size, ours and laplace-torch's")
    parser.add_argument("--no-laplace", action="store_true", help="skip laplace-torch")
    parser.add_argument("--no-end-to-end", action="store_true", help="skip the end-to-end fit_laplace timings")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    model, splits = load_mnist_mlp(device)
    x, y = splits.train.x, splits.train.y
    lik = cv.CrossEntropy()
    load_before = os.getloadavg()[0]
    log(f"device {describe_device(device)}, torch {torch.__version__}, {len(x)} points, load {load_before:.2f}")

    generator = torch.Generator(device=device).manual_seed(0)
    tasks: dict[str, Callable[[], Any]] = {"epoch": training_epoch(model, x, y, batch_size=128)}
    for method in ("kfac", "kflr", "kfra"):
        tasks[method] = lambda method=method: cv.fit_kronecker(
            model, (x, y), lik, method=method, mc_samples=1, batch_size=args.batch_size, generator=generator
        )
    tasks["diag"] = lambda: cv.fit_diagonal(model, (x, y), lik, method="ggn", batch_size=args.batch_size)
    decomposers: dict[str, Callable[[Any], Any]] = {}
    if not args.no_laplace:
        loader = DataLoader(TensorDataset(x, y), batch_size=args.batch_size, shuffle=False)
        for name, (fit, decompose) in laplace_torch_fitters(model, loader).items():
            tasks[name] = fit
            decomposers[name] = decompose

    # Round-robin (one warm-up round, then --repeat timed rounds) so that load from other processes on a
    # shared machine falls on every method and on the epoch alike, rather than on whichever ran at the time.
    times: dict[str, list[float]] = {name: [] for name in tasks}
    decompose_times: dict[str, list[float]] = {name: [] for name in decomposers}
    results: dict[str, Any] = {}
    for round_ in range(-1, args.repeat):
        label = "warm-up" if round_ < 0 else f"round {round_ + 1}/{args.repeat}"
        for name, fn in tasks.items():
            seconds, results[name] = timed(fn, device)
            line = f"{label} {name}: {seconds:.3f} s"
            if name in decomposers:
                decompose_seconds, _ = timed(lambda name=name: decomposers[name](results[name]), device)
                line += f" (its eigendecomposition, timed apart: {decompose_seconds:.3f} s)"
                if round_ >= 0:
                    decompose_times[name].append(decompose_seconds)
            if round_ >= 0:
                times[name].append(seconds)
            log(line)

    epoch = statistics.median(times.pop("epoch"))
    methods: dict[str, dict[str, float]] = {}
    for name, values in times.items():
        seconds = statistics.median(values)
        methods[name] = {"fit_seconds": seconds, "fit_over_epoch": seconds / epoch}
        if name in decompose_times:
            methods[name]["decompose_seconds"] = statistics.median(decompose_times[name])
        bar = f" (bar ≤ {BARS[name]:g})" if name in BARS else ""
        log(f"{name}: {seconds:.3f} s = {seconds / epoch:.2f} × epoch{bar}")
    laplace_version = None
    if decomposers:
        from importlib.metadata import version

        laplace_version = version("laplace-torch")

    agree: dict[str, Any] = {}
    pairs = (
        ("kflr_vs_laplace_torch_kflr", "kflr", "laplace_torch_kflr"),
        ("kfac_vs_laplace_torch_kfac", "kfac", "laplace_torch_kfac"),
    )
    for key, ours, theirs in pairs:
        if ours in results and theirs in results:
            agree[key] = agreement(results[ours], results[theirs])
            log(f"{key}: max relative block difference {agree[key]['max_block_rel_diff']:.2e}")

    e2e = None if args.no_end_to_end else end_to_end(model, splits, args.repeat, device)
    payload = {
        "device": str(device),
        "device_name": describe_device(device),
        "torch": torch.__version__,
        "laplace_torch": laplace_version,
        "n_data": len(x),
        "batch_size": args.batch_size,
        "repeat": args.repeat,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        # 1-minute load averages at start and end: on a shared machine, a load above the core count means the
        # timings (the small-batch epoch most of all) are inflated by other processes.
        "load_average": {"start": load_before, "end": os.getloadavg()[0], "cpu_count": os.cpu_count()},
        "epoch_seconds": epoch,
        "bars": BARS,
        "methods": methods,
        "agreement": agree,
    }
    if e2e is not None:
        payload["end_to_end"] = e2e["fits"]
        payload["end_to_end_epoch_seconds"] = e2e["epoch_seconds"]
        payload["end_to_end_epochs"] = e2e["epochs"]
        payload["end_to_end_bars"] = E2E_BARS
        payload["load_average"]["end"] = os.getloadavg()[0]
    json_path, md_path = write_report("fit", payload, markdown(payload))
    log(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Second-order optimiser benchmark: steps and CPU seconds to tuned Adam's final loss (thesis Fig. 4.1 style).

Problem: the 5,000 MNIST-5k images (pixels / 255), autoencoder 784-256-64-16-64-256-784 with tanh hidden layers
and a linear 16-unit code, Bernoulli loss on the logits (binary cross-entropy summed over pixels, averaged over
the batch), no weight decay, batches of 500, loss on all 5,000 images every 10 steps. Every method starts from
the same weights and sees the same batches (a permutation per epoch, cached in ``bench/cache/``).

Methods: our :class:`curvature.SecondOrderOptimizer` with KFRA, KFLR, KFAC and diagonal curvature (library
defaults), Adam for 1,000 steps at four learning rates (the best is "tuned Adam"), and kfac-jax with the
settings of its MNIST autoencoder example, run in a subprocess (jax is only in the bench environment: ``make
bench-optim`` installs it). Times are process CPU seconds of the training steps on one thread (evaluation and
jax's one-off compilation excluded); wall seconds beside them.

Usage: ``python -m bench.optim [--steps 1000] [--adam-steps 1000] [--skip-kfac-jax] [--report-only]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import curvature as cv
from curvature.data import mnist5k

BENCH_DIR = Path(__file__).resolve().parent
CACHE_DIR = BENCH_DIR / "cache"
RESULTS_DIR = BENCH_DIR / "results"
CURVES_PATH = CACHE_DIR / "optim_curves.json"  # every loss curve, for --report-only

WIDTHS = (784, 256, 64, 16, 64, 256, 784)
CODE_LAYER = 3  # index of the Linear layer whose output is the (linear) code
BATCH = 500
EVAL_EVERY = 10
ADAM_LRS = (3e-4, 1e-3, 3e-3, 1e-2)
OURS = ("kfra", "kflr", "kfac", "diag")
SEED = 0

# kfac-jax's MNIST autoencoder example (examples/autoencoder_mnist/pipeline.py), without weight decay.
KFAC_JAX_SETTINGS = {
    "use_adaptive_learning_rate": True,
    "use_adaptive_momentum": True,
    "use_adaptive_damping": True,
    "initial_damping": 150.0,
    "min_damping": 1e-5,
    "max_damping": 1000.0,
    "damping_adaptation_decay": 0.95,
    "damping_adaptation_interval": 5,
    "inverse_update_period": 5,
    "curvature_ema": 0.95,
    "num_burnin_steps": 5,
    "l2_reg": 0.0,
}


# ---------------------------------------------------------------------------- problem


def autoencoder() -> nn.Sequential:
    """784-256-64-16-64-256-784: tanh after every hidden layer except the linear code layer."""
    layers: list[nn.Module] = []
    n = len(WIDTHS) - 1
    for i, (fan_in, fan_out) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:], strict=True)):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < n - 1 and i != CODE_LAYER - 1:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def images() -> torch.Tensor:
    """All 5,000 MNIST-5k images, (5000, 784) float32 in [0, 1]."""
    splits = mnist5k(seed=0)
    return torch.cat([splits.train.x, splits.val.x, splits.test.x]).reshape(-1, 784).contiguous()


def problem(max_steps: int) -> dict[str, np.ndarray]:
    """Initial weights and batch order shared by every method (cached as an .npz)."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    path = CACHE_DIR / f"optim_problem_seed{SEED}_steps{max_steps}.npz"
    if path.exists():
        with np.load(path) as data:
            return dict(data)
    torch.manual_seed(SEED)
    model = autoencoder()
    arrays: dict[str, np.ndarray] = {}
    for i, layer in enumerate(m for m in model if isinstance(m, nn.Linear)):
        arrays[f"w{i}"] = layer.weight.detach().numpy().copy()
        arrays[f"b{i}"] = layer.bias.detach().numpy().copy()
    rng = np.random.default_rng(SEED)
    per_epoch = 5000 // BATCH
    epochs = math.ceil(max_steps / per_epoch)
    order = np.concatenate([rng.permutation(5000) for _ in range(epochs)]).reshape(-1, BATCH)[:max_steps]
    arrays["order"] = order.astype(np.int64)
    np.savez(path, **arrays)
    return arrays


def build_model(arrays: dict[str, np.ndarray]) -> nn.Sequential:
    model = autoencoder()
    with torch.no_grad():
        for i, layer in enumerate(m for m in model if isinstance(m, nn.Linear)):
            layer.weight.copy_(torch.from_numpy(arrays[f"w{i}"]))
            layer.bias.copy_(torch.from_numpy(arrays[f"b{i}"]))
    return model


LIKELIHOOD = cv.Bernoulli()


@torch.no_grad()
def full_loss(model: nn.Module, x: torch.Tensor) -> float:
    return float(LIKELIHOOD.nll(model(x), x) / len(x))


# ---------------------------------------------------------------------------- runs


class Clock:
    """Accumulates process CPU and wall seconds of the timed sections only."""

    def __init__(self) -> None:
        self.cpu = 0.0
        self.wall = 0.0

    def __enter__(self) -> Clock:
        self._c, self._w = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.cpu += time.process_time() - self._c
        self.wall += time.perf_counter() - self._w


def _record(curve: list, step: int, model: nn.Module, x: torch.Tensor, clock: Clock) -> None:
    curve.append({"step": step, "loss": full_loss(model, x), "seconds": clock.cpu, "wall_seconds": clock.wall})


def run_adam(arrays, x: torch.Tensor, lr: float, steps: int) -> list[dict]:
    model = build_model(arrays)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    order = torch.from_numpy(arrays["order"])
    clock = Clock()
    curve: list[dict] = []
    _record(curve, 0, model, x, clock)
    for t in range(steps):
        xb = x[order[t]]
        with clock:
            opt.zero_grad(set_to_none=True)
            loss = LIKELIHOOD.nll(model(xb), xb) / len(xb)
            loss.backward()
            opt.step()
        if (t + 1) % EVAL_EVERY == 0 or t + 1 == steps:
            _record(curve, t + 1, model, x, clock)
    return curve


def run_ours(arrays, x: torch.Tensor, curvature: str, steps: int) -> tuple[list[dict], list[dict]]:
    model = build_model(arrays)
    opt = cv.SecondOrderOptimizer(model, LIKELIHOOD, cv.OptimizerConfig(curvature=curvature))
    order = torch.from_numpy(arrays["order"])
    clock = Clock()
    curve: list[dict] = []
    infos: list[dict] = []
    _record(curve, 0, model, x, clock)
    for t in range(steps):
        xb = x[order[t]]
        with clock:
            info = opt.step(xb, xb)
        infos.append(info.as_dict())
        if (t + 1) % EVAL_EVERY == 0 or t + 1 == steps:
            _record(curve, t + 1, model, x, clock)
    return curve, infos


def run_kfac_jax(arrays, steps: int) -> dict:
    """kfac-jax in a subprocess on one thread; returns its curve and compile time."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    data_path = CACHE_DIR / "optim_kfac_jax_input.npz"
    out_path = CACHE_DIR / "optim_kfac_jax_output.json"
    np.savez(data_path, x=images().numpy(), **arrays)
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    env["JAX_PLATFORMS"] = "cpu"
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "bench.optim", "--kfac-jax-worker", str(data_path), str(out_path)]
    command += ["--steps", str(steps)]
    subprocess.run(command, check=True, env=env, cwd=BENCH_DIR.parent)
    return json.loads(out_path.read_text())


def kfac_jax_worker(data_path: str, out_path: str, steps: int) -> None:
    """Runs inside the subprocess: the same autoencoder, weights and batches in jax with kfac-jax."""
    import jax
    import jax.numpy as jnp
    import kfac_jax

    jax.config.update("jax_enable_x64", False)
    data = dict(np.load(data_path))
    x_all = jnp.asarray(data["x"])
    n_layers = len(WIDTHS) - 1
    # our weights are (out, in); jax multiplies x @ w with (in, out)
    params = [{"w": jnp.asarray(data[f"w{i}"].T), "b": jnp.asarray(data[f"b{i}"])} for i in range(n_layers)]

    def forward(p, xb):
        h = xb
        for i, layer in enumerate(p):
            h = h @ layer["w"] + layer["b"]
            if i < n_layers - 1 and i != CODE_LAYER - 1:
                h = jnp.tanh(h)
        return h

    def bce(logits, y):
        return jnp.mean(jnp.sum(jnp.logaddexp(0.0, logits) - y * logits, axis=-1))

    def loss_fn(p, batch):
        logits = forward(p, batch)
        kfac_jax.register_sigmoid_cross_entropy_loss(logits, batch)
        return bce(logits, batch)

    full = jax.jit(lambda p: bce(forward(p, x_all), x_all))
    settings = dict(KFAC_JAX_SETTINGS)
    burnin = settings.pop("num_burnin_steps")
    opt = kfac_jax.Optimizer(
        value_and_grad_func=jax.value_and_grad(loss_fn), multi_device=False, num_burnin_steps=burnin, **settings
    )
    order = data["order"]
    key = jax.random.PRNGKey(SEED)

    def batch(t):
        return x_all[order[t % len(order)]]

    def timed(fn):
        c, w = time.process_time(), time.perf_counter()
        out = fn()
        jax.block_until_ready(out)
        return out, time.process_time() - c, time.perf_counter() - w

    def batches():
        # kfac-jax's burn-in (curvature estimation only, parameters unchanged) draws its batches from the same
        # iterator before the first step: it sees the first batch, so that every step sees our batch order
        for _ in range(burnin):
            yield batch(0)
        t = 0
        while True:
            yield batch(t)
            t += 1

    # compile once on a throwaway state, so that the timed run measures steps only
    key, sub = jax.random.split(key)
    warm_iter = batches()
    warm = jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), params)  # kfac-jax donates its inputs
    warm_state, c0, _ = timed(lambda: opt.init(warm, sub, batch(0)))
    (warm, warm_state, _), c1, _ = timed(
        lambda: opt.step(warm, warm_state, sub, data_iterator=warm_iter, global_step_int=0)
    )
    compile_seconds = c0 + c1
    for t in range(1, 7):  # the first steps of each kind (inverse updates, damping adaptation) compile too
        (warm, warm_state, _), c, _ = timed(
            lambda t=t, p=warm, s=warm_state: opt.step(p, s, sub, data_iterator=warm_iter, global_step_int=t)
        )
        compile_seconds += c

    cpu = wall = 0.0
    key, sub = jax.random.split(key)
    state, c, w = timed(lambda: opt.init(params, sub, batch(0)))
    cpu, wall = cpu + c, wall + w
    curve = [{"step": 0, "loss": float(full(params)), "seconds": cpu, "wall_seconds": wall}]
    data_iter = batches()
    for t in range(steps):
        key, sub = jax.random.split(key)
        (params, state, _), c, w = timed(
            lambda t=t, sub=sub, p=params, s=state: opt.step(p, s, sub, data_iterator=data_iter, global_step_int=t)
        )
        cpu, wall = cpu + c, wall + w
        if (t + 1) % EVAL_EVERY == 0 or t + 1 == steps:
            curve.append({"step": t + 1, "loss": float(full(params)), "seconds": cpu, "wall_seconds": wall})
    Path(out_path).write_text(json.dumps({"curve": curve, "compile_seconds": compile_seconds}))


# ---------------------------------------------------------------------------- report


def first_reaching(curve: list[dict], target: float) -> tuple[int | None, float | None]:
    for point in curve:
        if point["loss"] <= target:
            return point["step"], point["seconds"]
    return None, None


def summarise(curve: list[dict], target: float | None) -> dict:
    last = curve[-1]
    out = {
        "final_loss": last["loss"],
        "steps": last["step"],
        "seconds": last["seconds"],
        "wall_seconds": last["wall_seconds"],
    }
    if target is not None:
        out["steps_to_adam_loss"], out["seconds_to_adam_loss"] = first_reaching(curve, target)
    return out


def write_markdown(result: dict, path: Path) -> None:
    p = result["problem"]
    best = result["adam_best"]
    lines = [
        "# Second-order optimiser: MNIST-5k autoencoder",
        "",
        f"{p['architecture']} autoencoder, {p['loss']}, batches of {p['batch_size']}, loss on all {p['n_images']} "
        f"images every {p['eval_every']} steps, one CPU thread, process CPU seconds of the training steps "
        f"(evaluation and kfac-jax's compilation excluded). Our methods: {p['steps_ours']} steps with library "
        f"defaults; Adam and kfac-jax: {p['steps_adam']} steps.",
        "",
        f"Tuned Adam: lr {best['lr']:g}, final loss {best['final_loss']:.2f} after {best['steps']} steps, "
        f"{best['seconds']:.1f} s CPU ({1000 * best['seconds'] / best['steps']:.1f} ms/step).",
        "",
        "| method | final loss | steps | CPU s | ms/step | steps to Adam's loss | CPU s to Adam's loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in result["methods"].items():
        steps_to = "never" if m["steps_to_adam_loss"] is None else str(m["steps_to_adam_loss"])
        secs_to = "never" if m["seconds_to_adam_loss"] is None else f"{m['seconds_to_adam_loss']:.1f}"
        lines.append(
            f"| {name} | {m['final_loss']:.2f} | {m['steps']} | {m['seconds']:.1f} | "
            f"{1000 * m['seconds'] / m['steps']:.1f} | {steps_to} | {secs_to} |"
        )
    lines.append("")
    grid = p["adam_grid"]
    lines.append("Adam learning rates (final loss): " + ", ".join(f"{lr} → {loss:.2f}" for lr, loss in grid.items()))
    if f"{best['lr']:g}" in (min(grid, key=float), max(grid, key=float)):
        lines.append("(the best learning rate is at the edge of the grid the issue fixes)")
    if "kfac_jax" in result["methods"]:
        lines.append("")
        lines.append(
            f"kfac-jax one-off compilation: {result['methods']['kfac_jax']['compile_seconds']:.1f} s CPU (its first "
            "seven steps on a throwaway copy, run time included), not counted above."
        )
    bar = evaluate_bar(result)
    if bar:
        lines += [
            "",
            "Bar (KFRA and KFLR: fewer steps than kfac-jax to Adam's loss, no more CPU time than Adam, "
            "final loss below kfac-jax's):",
        ]
        lines += [f"- {name}: {'met' if ok else 'not met'} ({why})" for name, (ok, why) in bar.items()]
    path.write_text("\n".join(lines) + "\n")


def plot(curves: dict[str, list[dict]], path: Path, target: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, curve in curves.items():
        steps = [p["step"] for p in curve]
        secs = [p["seconds"] for p in curve]
        loss = [p["loss"] for p in curve]
        style = "--" if name.startswith("adam") or name == "kfac_jax" else "-"
        axes[0].plot(steps, loss, style, label=name)
        axes[1].plot(secs, loss, style, label=name)
    for ax, xlabel in zip(axes, ("steps", "CPU seconds (one thread)"), strict=True):
        if target is not None:
            ax.axhline(target, color="grey", linewidth=0.8, linestyle=":", label="tuned Adam's final loss")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("training loss (all 5,000 images)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("MNIST-5k autoencoder 784-256-64-16-64-256-784, Bernoulli loss")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def evaluate_bar(result: dict) -> dict[str, tuple[bool, str]]:
    methods = result["methods"]
    adam = result["adam_best"]
    rival = methods.get("kfac_jax")
    out = {}
    for name in ("kfra", "kflr"):
        m = methods.get(name)
        if m is None:
            continue
        reasons = []
        ok = m["steps_to_adam_loss"] is not None
        if not ok:
            reasons.append("never reaches Adam's loss")
        else:
            if rival is not None and rival["steps_to_adam_loss"] is not None:
                fewer = m["steps_to_adam_loss"] < rival["steps_to_adam_loss"]
                ok &= fewer
                reasons.append(f"{m['steps_to_adam_loss']} vs kfac-jax {rival['steps_to_adam_loss']} steps")
            cheaper = m["seconds_to_adam_loss"] <= adam["seconds"]
            ok &= cheaper
            reasons.append(f"{m['seconds_to_adam_loss']:.1f} s vs Adam {adam['seconds']:.1f} s")
        if rival is not None:
            below = m["final_loss"] < rival["final_loss"]
            ok &= below
            reasons.append(f"final {m['final_loss']:.2f} vs kfac-jax {rival['final_loss']:.2f}")
        out[name] = (bool(ok), "; ".join(reasons))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000, help="steps of our optimiser")
    parser.add_argument("--adam-steps", type=int, default=1000, help="steps of Adam and kfac-jax")
    parser.add_argument("--methods", default=",".join(OURS), help="which of ours to run")
    parser.add_argument("--skip-kfac-jax", action="store_true")
    parser.add_argument("--report-only", action="store_true", help="rewrite the .md and .png from optim.json")
    parser.add_argument("--kfac-jax-worker", nargs=2, metavar=("NPZ", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.report_only:
        result = json.loads((RESULTS_DIR / "optim.json").read_text())
        write_markdown(result, RESULTS_DIR / "optim.md")
        curves = json.loads(CURVES_PATH.read_text())
        plot(curves, RESULTS_DIR / "optim.png", result["adam_best"]["final_loss"])
        return 0
    if args.kfac_jax_worker:
        kfac_jax_worker(*args.kfac_jax_worker, steps=args.steps)
        return 0

    torch.set_num_threads(1)
    arrays = problem(max(args.steps, args.adam_steps))
    x = images()
    curves: dict[str, list[dict]] = {}
    adam_runs = []
    for lr in ADAM_LRS:
        curve = run_adam(arrays, x, lr, args.adam_steps)
        curves[f"adam_{lr:g}"] = curve
        adam_runs.append({"lr": lr, **summarise(curve, None)})
        print(f"adam lr={lr:g}: {adam_runs[-1]}", flush=True)
    best = min(adam_runs, key=lambda r: r["final_loss"] if math.isfinite(r["final_loss"]) else math.inf)
    target = best["final_loss"]
    methods: dict[str, dict] = {}
    diagnostics: dict[str, list[dict]] = {}
    for name in [m for m in args.methods.split(",") if m]:
        curve, infos = run_ours(arrays, x, name, args.steps)
        curves[name] = curve
        diagnostics[name] = infos
        methods[name] = summarise(curve, target)
        print(f"{name}: {methods[name]}", flush=True)
    if not args.skip_kfac_jax:
        out = run_kfac_jax(arrays, args.adam_steps)
        curves["kfac_jax"] = out["curve"]
        methods["kfac_jax"] = {**summarise(out["curve"], target), "compile_seconds": out["compile_seconds"]}
        print(f"kfac_jax: {methods['kfac_jax']}", flush=True)

    result = {
        "problem": {
            "data": "MNIST-5k, all 5,000 images, pixels / 255",
            "n_images": 5000,
            "architecture": "784-256-64-16-64-256-784 (tanh hidden, linear 16-unit code)",
            "loss": "Bernoulli on logits: binary cross-entropy summed over pixels, averaged over the batch",
            "weight_decay": 0.0,
            "batch_size": BATCH,
            "eval_every": EVAL_EVERY,
            "steps_ours": args.steps,
            "steps_adam": args.adam_steps,
            "threads": 1,
            "seconds": "process CPU seconds of the training steps; evaluation and jax compilation excluded",
            "config": {k: str(v) for k, v in vars(cv.OptimizerConfig()).items()},
            "adam_grid": {f"{r['lr']:g}": r["final_loss"] for r in adam_runs},
            "kfac_jax": "kfac-jax 0.0.8 on jax 0.9.0.1, settings of its MNIST autoencoder example, l2_reg 0",
        },
        "adam_best": {k: best[k] for k in ("lr", "final_loss", "steps", "seconds")},
        "methods": methods,
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "optim.json").write_text(json.dumps(result, indent=1))
    CURVES_PATH.write_text(json.dumps(curves))
    write_markdown(result, RESULTS_DIR / "optim.md")
    plot(curves, RESULTS_DIR / "optim.png", target)
    print((RESULTS_DIR / "optim.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

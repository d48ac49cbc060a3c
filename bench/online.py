"""Online Laplace on permuted and disjoint MNIST-5k (thesis §5.4.1-5.4.2, Fig. 5.7 and 5.9, Table 5.3).

Every method trains the thesis's 784-100-100-10 ReLU MLP from the same initial weights with the same optimiser
budget (the same epochs and batch size per task, the same prior precision ``τ``); only the penalty differs.
Permuted MNIST uses Adam for every row. On disjoint MNIST each row picks Adam or Nesterov momentum (lr 0.1 with the
thesis's §5.4.2 rule: the second task's initial learning rate divided by ``max(1, strength/10)``) on validation,
as the thesis picked optimisers per method (§5.4.1). Rows:

* ``online_kf`` / ``online_diag``: online Laplace (eq. 5.23, 5.25) with KFLR or the exact GGN diagonal;
* ``ewc_kf`` / ``ewc_diag``: a penalty per task around its own optimum (eq. 5.26; ``ewc_diag`` is the original EWC);
* ``nononline_kf`` / ``nononline_diag``: every task's curvature recomputed at the latest optimum (eq. 5.24);
* ``si``: Synaptic Intelligence; ``finetune``: no penalty (lower bound); ``joint``: all data so far (upper bound).

The strength (``λ`` for Laplace, ``c`` for SI) of each row is chosen by the mean validation accuracy over all
tasks after the last one; the tables report test accuracy (the held-out digits of each task) at that strength.

Permuted MNIST-5k: task 0 is MNIST-5k, tasks 1-9 apply fixed seeded pixel permutations (``permuted_mnist``), each
split 4,000 / 500 / 500. Disjoint MNIST-5k: digits 0-4, then 5-9, one 10-way head (``disjoint_mnist``),
2,000 / 250 / 250 each.

Run ``python -m bench.online`` (``--quick`` for a smoke run); writes ``bench/results/online.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

import curvature as cv
from curvature.continual import ContinualConfig, ContinualLearner, run_tasks
from curvature.data import disjoint_mnist, permuted_mnist

RESULTS_DIR = Path(__file__).resolve().parent / "results"
WIDTHS = (784, 100, 100, 10)

ROWS: dict[str, tuple[str, str]] = {
    "online_kf": ("online", "kflr"),
    "online_diag": ("online", "diag"),
    "ewc_kf": ("ewc", "kflr"),
    "ewc_diag": ("ewc", "diag"),
    "nononline_kf": ("nononline", "kflr"),
    "nononline_diag": ("nononline", "diag"),
    "si": ("si", "diag"),
    "finetune": ("finetune", "diag"),
    "joint": ("joint", "diag"),
}
HALF_DECADES = (1.0, 3.0)
LAPLACE_GRID = {
    "permuted": (1.0, 3.0, 10.0, 30.0, 100.0),  # thesis §5.4.1
    "disjoint": tuple(m * 10.0**e for e in range(6) for m in HALF_DECADES),  # 1 … 3e5 (thesis §5.4.2: to 1e6)
}
SI_GRID = {
    "permuted": (0.01, 0.03, 0.1, 0.3, 1.0),
    "disjoint": tuple(m * 10.0**e for e in range(-1, 4) for m in HALF_DECADES),  # 0.1 … 3e3
}
T0 = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {message}", file=sys.stderr, flush=True)


def mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:], strict=True)):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(fan_in, fan_out))
    return nn.Sequential(*layers)


def grid_for(row: str, bench: str) -> tuple[float, ...]:
    if row in ("finetune", "joint"):
        return (0.0,)
    return SI_GRID[bench] if row == "si" else LAPLACE_GRID[bench]


def optimiser_options(optimiser: str, strength: float, row: str, args) -> dict:
    """``adam``: lr ``--lr`` throughout. ``nag``: Nesterov momentum 0.9, lr 0.1, and the thesis's §5.4.2 rule for the
    later tasks' initial learning rate, divided by ``max(1, strength / 10)`` (``lr_decay = strength / 10 − 1``)."""
    if optimiser == "adam":
        return {"optimizer": "adam", "lr": args.lr}
    decay = 0.0 if row in ("finetune", "joint") else max(strength / 10.0 - 1.0, 0.0)
    return {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "lr_decay": decay}


def run_one(row: str, strength: float, optimiser: str, tasks, epochs: int, args) -> dict:
    """One sequence of tasks; the validation and test accuracy matrices."""
    method, curvature = ROWS[row]
    cfg = ContinualConfig(
        method=method,
        curvature=curvature,
        strength=strength,
        prior_precision=args.prior_precision,
        epochs=epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        **optimiser_options(optimiser, strength, row, args),
    )
    learner = ContinualLearner(mlp(args.seed), cv.CrossEntropy(), cfg)
    pairs = [((t.train.x, t.train.y), (t.val.x, t.val.y)) for t in tasks]
    tests = [(t.test.x, t.test.y) for t in tasks]
    test_rows: list[list[float]] = []
    started = time.perf_counter()
    run_tasks(learner, pairs, checkpoint=lambda lr: test_rows.append(lr.evaluate(tests[: lr.n_tasks])))
    return {
        "strength": strength,
        "optimizer": optimiser,
        "val": learner.accuracy,
        "test": test_rows,
        "val_final_avg_acc": sum(learner.accuracy[-1]) / len(learner.accuracy[-1]),
        "seconds": time.perf_counter() - started,
    }


def walk_grid(bench: str, row: str, optimiser: str, grid, tasks, epochs: int, args) -> list[dict]:
    """Runs of one row over its grid (ascending); on permuted MNIST it stops after ``--patience`` non-improving
    points in a row (the disjoint grid is cheap and its accuracy can stay flat before it rises, so it runs whole)."""
    runs, worse = [], 0
    patience = args.patience if bench == "permuted" else 0
    for strength in grid:
        if patience and worse >= patience:
            log(f"{bench} {row} {optimiser}: validation accuracy fell {worse} times in a row; larger strengths skipped")
            break
        try:
            res = run_one(row, strength, optimiser, tasks, epochs, args)
        except FloatingPointError as exc:
            log(f"{bench} {row} {optimiser} strength={strength:g}: diverged ({exc})")
            worse += 1
            continue
        best_so_far = max((r["val_final_avg_acc"] for r in runs), default=-1.0)
        worse = worse + 1 if res["val_final_avg_acc"] < best_so_far else 0
        runs.append(res)
        log(
            f"{bench} {row} {optimiser} strength={strength:g}: val {res['val_final_avg_acc']:.4f}, test "
            f"{sum(res['test'][-1]) / len(res['test'][-1]):.4f} ({res['seconds']:.1f}s)"
        )
    return runs


def run_bench(bench: str, tasks, rows: list[str], args) -> dict:
    """Every row of one benchmark, each at its validation-selected optimiser and strength.

    On disjoint MNIST (two tasks) ``ewc`` and ``nononline`` reduce to ``online`` up to the centre of the weak prior
    ``τ`` (thesis §5.4.2), so those rows run once, at the optimiser and strength selected for the ``online`` row of
    the same curvature.
    """
    epochs = args.disjoint_epochs if bench == "disjoint" else args.epochs
    optimisers = args.disjoint_optimizers if bench == "disjoint" else args.optimizers
    out = {}
    for row in rows:
        shared = bench == "disjoint" and row.split("_")[0] in ("ewc", "nononline")
        source = "online_" + row.split("_")[1] if shared else None
        runs = []
        if shared and source in out:
            sel = out[source]
            runs = walk_grid(bench, row, sel["optimizer"], (sel["strength"],), tasks, epochs, args)
        else:
            for optimiser in optimisers.split(","):
                grid = grid_for(row, bench)
                if args.strength and row not in ("finetune", "joint"):
                    grid = (args.strength,)
                elif args.grid and row not in ("finetune", "joint"):
                    grid = tuple(float(v) for v in args.grid.split(","))
                runs += walk_grid(bench, row, optimiser, grid, tasks, epochs, args)
        if not runs:
            continue
        best = max(runs, key=lambda r: r["val_final_avg_acc"])  # first of equals: the weakest strength
        final = best["test"][-1]
        out[row] = {
            "final_avg_acc": sum(final) / len(final),
            "first_task_acc": final[0],
            "per_task": final,
            "strength": best["strength"] if row not in ("finetune", "joint") else None,
            "optimizer": best["optimizer"],
            "curve": [sum(r) / len(r) for r in best["test"]],
            "val_final_avg_acc": best["val_final_avg_acc"],
            "val_matrix": best["val"],
            "test_matrix": best["test"],
            "grid": {
                f"{r['optimizer']}:{r['strength']:g}": {
                    "val_final_avg_acc": r["val_final_avg_acc"],
                    "test_final_avg_acc": sum(r["test"][-1]) / len(r["test"][-1]),
                }
                for r in runs
            },
            "selected_like": source if shared and source in out else None,
            "seconds": sum(r["seconds"] for r in runs),
        }
    return out


def bar(results: dict) -> dict:
    """The acceptance criteria of the online-Laplace figure (the README's benchmark table)."""
    checks = {}
    p = results.get("permuted", {})
    if {"online_kf", "online_diag", "si", "joint"} <= set(p):
        kf = p["online_kf"]["final_avg_acc"]
        checks["permuted: online_kf >= online_diag + 3 points"] = kf >= p["online_diag"]["final_avg_acc"] + 0.03
        checks["permuted: online_kf >= si + 3 points"] = kf >= p["si"]["final_avg_acc"] + 0.03
        checks["permuted: online_kf within 5 points of joint"] = kf >= p["joint"]["final_avg_acc"] - 0.05
    d = results.get("disjoint", {})
    if {"online_kf", "online_diag", "si", "finetune"} <= set(d):
        kf = d["online_kf"]["final_avg_acc"]
        for other in ("online_diag", "si", "finetune"):
            checks[f"disjoint: online_kf > {other}"] = kf > d[other]["final_avg_acc"]
    return checks


def markdown(payload: dict) -> str:
    m = payload["meta"]
    lines = [
        "# Online Laplace: permuted and disjoint MNIST-5k",
        "",
        f"784-100-100-10 ReLU MLP; batch {m['batch_size']}, {m['epochs']} epochs per task on permuted and "
        f"{m['disjoint_epochs']} on disjoint MNIST, the same for every method; optimisers chosen on validation from "
        f"{m['optimizers']['permuted']} (permuted) and {m['optimizers']['disjoint']} (disjoint; nag = Nesterov "
        "momentum 0.9, lr 0.1, second task's lr divided by max(1, strength/10)); Adam lr "
        f"{m['lr']:g}; prior precision τ = {m['prior_precision']:g}; KF = KFLR, diag = exact GGN diagonal. "
        "Strength (λ, or c for SI) chosen by the mean validation accuracy over all tasks after the last task; "
        f"test accuracy reported. {m['device']}, torch {m['torch']}, seed {m['seed']}.",
        "",
        *[
            f"- {b}: `{m['commands'][b]}` — {m['seconds'][b]:.0f} s ({m['load'][b]} on 2 shared cores)"
            for b in m["commands"]
        ],
        "",
    ]
    for bench, title in (("permuted", "Permuted MNIST-5k"), ("disjoint", "Disjoint MNIST-5k (0-4, then 5-9)")):
        rows = payload["results"].get(bench)
        if not rows:
            continue
        n = len(next(iter(rows.values()))["per_task"])
        lines += [
            f"## {title}, {n} tasks",
            "",
            "| row | optimiser | strength | final avg test acc | first task | last task | val avg (selection) | seconds (grid) |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for row, r in rows.items():
            s = "—" if r["strength"] is None else f"{r['strength']:g}"
            lines.append(
                f"| {row} | {r['optimizer']} | {s} | {100 * r['final_avg_acc']:.2f} | {100 * r['first_task_acc']:.2f} | "
                f"{100 * r['per_task'][-1]:.2f} | {100 * r['val_final_avg_acc']:.2f} | {r['seconds']:.0f} |"
            )
        lines += ["", "Strengths tried (optimiser:strength → mean validation accuracy after the last task):", ""]
        for row, r in rows.items():
            tried = ", ".join(f"{k} → {100 * v['val_final_avg_acc']:.1f}" for k, v in r["grid"].items())
            like = f" (the {r['selected_like']} row's selection)" if r.get("selected_like") else ""
            lines.append(f"- {row}: {tried}{like}")
        lines += ["", "Mean test accuracy over the tasks seen so far, after each task:", ""]
        lines.append("| row | " + " | ".join(str(i + 1) for i in range(n)) + " |")
        lines.append("|---|" + "---:|" * n)
        for row, r in rows.items():
            lines.append(f"| {row} | " + " | ".join(f"{100 * a:.1f}" for a in r["curve"]) + " |")
        lines.append("")
    if m.get("notes"):
        lines += ["## Notes", "", *[f"- {note}" for note in m["notes"]], ""]
    lines += ["## The bar", ""]
    for check, ok in payload["bar"].items():
        lines.append(f"- {'met' if ok else 'NOT met'}: {check}")
    lines.append("")
    return "\n".join(lines) + "\n"


def figure(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    perm = payload["results"].get("permuted", {})
    ax = axes[0]
    for row, r in perm.items():
        style = "k:" if row == "joint" else ("-" if row.endswith("_kf") else "--")
        ax.plot(range(1, len(r["curve"]) + 1), [100 * a for a in r["curve"]], style, marker="o", ms=3, label=row)
    ax.set(xlabel="tasks seen", ylabel="mean test accuracy (%)", title="Permuted MNIST-5k (cf. thesis Fig. 5.7)")
    if perm:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax = axes[1]
    disj = payload["results"].get("disjoint", {})
    for row, r in disj.items():
        if row in ("finetune", "joint"):
            ax.axhline(100 * r["final_avg_acc"], ls=":", color="k" if row == "joint" else "grey", label=row)
            continue
        if r.get("selected_like"):
            continue
        keys = sorted(
            (k for k in r["grid"] if k.startswith(r["optimizer"] + ":")), key=lambda k: float(k.split(":")[1])
        )
        xs = [float(k.split(":")[1]) for k in keys]
        ys = [100 * r["grid"][k]["test_final_avg_acc"] for k in keys]
        ax.plot(xs, ys, marker="o", ms=3, label=f"{row} ({r['optimizer']})")
    ax.set_xscale("log")
    ax.set(
        xlabel="strength (λ; c for SI)",
        ylabel="final mean test accuracy (%)",
        title="Disjoint MNIST-5k (cf. thesis Fig. 5.9)",
    )
    if disj:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=10, help="permuted MNIST tasks")
    parser.add_argument("--epochs", type=int, default=10, help="epochs per task on permuted MNIST")
    parser.add_argument("--disjoint-epochs", type=int, default=20, help="epochs per task on disjoint MNIST")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--optimizers", default="adam", help="permuted MNIST: adam and/or nag, chosen on validation")
    parser.add_argument("--disjoint-optimizers", default="nag,adam", help="disjoint MNIST: adam and/or nag")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--prior-precision", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows")
    parser.add_argument("--benchmarks", default="permuted,disjoint")
    parser.add_argument("--strength", type=float, default=None, help="one strength for every row (no grid)")
    parser.add_argument("--grid", default=None, help="comma-separated strengths replacing the rows' grids")
    parser.add_argument(
        "--patience",
        type=int,
        default=2,
        help="stop a row's grid (ascending) once validation accuracy fell below its best this many times in a row; 0: never",
    )
    parser.add_argument(
        "--update", action="store_true", help="keep the results in online.json of benchmarks and rows not run now"
    )
    parser.add_argument("--report-only", action="store_true", help="rebuild online.md and .png from online.json")
    parser.add_argument("--quick", action="store_true", help="3 tasks, 2 epochs: a smoke run")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.quick:
        args.tasks, args.epochs, args.disjoint_epochs = 3, 2, 2
    rows = [r for r in args.rows.split(",") if r]
    unknown = set(rows) - set(ROWS)
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}; choose from {list(ROWS)}")
    if args.report_only:
        doc = json.loads((args.out / "online.json").read_text())
        payload = {"meta": doc["meta"], "results": {b: doc[b] for b in ("permuted", "disjoint") if b in doc}}
        payload["bar"] = bar(payload["results"])
        (args.out / "online.md").write_text(markdown(payload))
        figure(payload, args.out / "online.png")
        log(f"rewrote {args.out / 'online.md'} and .png from online.json")
        return 0
    torch.set_num_threads(args.threads)
    results, seconds = {}, {}
    for bench in args.benchmarks.split(","):
        tasks = permuted_mnist(args.tasks, seed=args.seed) if bench == "permuted" else disjoint_mnist(seed=args.seed)
        log(f"{bench}: {len(tasks)} tasks of {len(tasks[0].train)} / {len(tasks[0].val)} / {len(tasks[0].test)}")
        t0 = time.perf_counter()
        results[bench] = run_bench(bench, tasks, rows, args)
        seconds[bench] = time.perf_counter() - t0
    command = "python -m bench.online " + " ".join(sys.argv[1:] if argv is None else argv)
    load = f"load {os.getloadavg()[0]:.1f} at the end"
    meta = {
        "commands": {bench: command for bench in results},
        "tasks": args.tasks,
        "epochs": args.epochs,
        "disjoint_epochs": args.disjoint_epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "prior_precision": args.prior_precision,
        "seed": args.seed,
        "grids": {"laplace": LAPLACE_GRID, "si": SI_GRID},
        "optimizers": {"permuted": args.optimizers, "disjoint": args.disjoint_optimizers},
        "device": f"{platform.machine()} CPU, {torch.get_num_threads()} thread(s) per process",
        "load": {bench: load for bench in results},
        "torch": torch.__version__,
        "seconds": seconds,
    }
    previous = args.out / "online.json"
    if args.update and previous.exists():  # keep the other benchmark's results from an earlier (or parallel) run
        old = json.loads(previous.read_text())
        for bench in ("permuted", "disjoint"):
            if bench not in old:
                continue
            if bench not in results:
                results[bench] = old[bench]
                for key in ("commands", "load", "seconds"):
                    meta[key][bench] = old["meta"][key][bench]
            elif set(old[bench]) - set(results[bench]):  # rows run by another process: merge, in ROWS order
                merged = {**old[bench], **results[bench]}
                results[bench] = {row: merged[row] for row in ROWS if row in merged}
                for key in ("commands", "load"):
                    if old["meta"][key][bench] != meta[key][bench]:
                        meta[key][bench] = f"{old['meta'][key][bench]}; {meta[key][bench]}"
                meta["seconds"][bench] = max(meta["seconds"][bench], old["meta"]["seconds"][bench])
        results = {b: results[b] for b in ("permuted", "disjoint") if b in results}
    payload = {"meta": meta, "results": results}
    payload["bar"] = bar(results)
    # the requested layout: {"permuted": {ROW: {...}}, "disjoint": {...}}, with the run's details beside it
    doc = {**results, "meta": payload["meta"], "bar": payload["bar"]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "online.json").write_text(json.dumps(doc, indent=1) + "\n")
    (args.out / "online.md").write_text(markdown(payload))
    figure(payload, args.out / "online.png")
    for check, ok in payload["bar"].items():
        log(f"{'met' if ok else 'NOT met'}: {check}")
    log(f"wrote {args.out / 'online.json'}, .md, .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

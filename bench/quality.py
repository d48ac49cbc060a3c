"""Predictive quality on MNIST-5k and out-of-distribution letters (DESIGN.md §6, last row).

Usage: ``python -m bench.quality [--device cuda] [--no-rival] [--no-cnn] [--no-plots]``

Rows, all evaluated on the MNIST-5k test split (500) and on 500 rendered letters A–J (out of distribution):

* ``map``: the trained 784-1024-1024-10 MLP of :mod:`bench.common`, deterministic.
* ``kfac``, ``kflr``, ``kfra``, ``diag``: our Laplace posteriors of that MLP (exact damping). For every
  curvature both predictives are tuned on the validation split (500 digits) and evaluated:

  - ``<c>_glm``: linearised predictive; ``(N_eff, τ)`` by :func:`curvature.tune_validation` (its 9 × 5 grid
    and two refinements, 32 logit samples), with ``log10(N_eff/N)`` searched over ``[-2, 6]``. It is tuned
    once with the MC link and once with the probit link; the link with the lower validation NLL is kept.
  - ``<c>_mc``: MC over weights; ``(N_eff, τ)`` by the same search with ``log10 τ ∈ [2, 6]``,
    ``log10(N_eff/N) ∈ [-2, 4]``, one refinement and 6 weight samples per candidate (each candidate redraws
    and re-rotates its samples, so this is the expensive part on a CPU).

  After each ``(N_eff, τ)`` search, :func:`curvature.tune_null_prior` (the ``fit_laplace`` default) gives the
  directions the training data never excited their own, broader prior, within 0.5 % of the tuned validation
  NLL; the GLM rows also report their metrics without it. The canonical row ``<c>`` is whichever of the two
  predictives has the lower validation NLL at the evaluation setting (100 samples). Nothing is chosen with
  the letters.
* ``laplace_torch_kron``: laplace-torch 0.3, ``Laplace(model, "classification", subset_of_weights="all",
  hessian_structure="kron")`` (its default backend, exact-GGN Kronecker factors), its prior precision chosen on
  the validation split over ``10^{-2}, 10^{-1.5}, …, 10^6``: at each value a fresh ``nn`` + ``mc`` predictive
  (6 samples, fixed seed) and its NLL; the lowest wins. We use ``pred_type="nn"`` with ``link_approx="mc"``
  because its ``glm`` predictive needs full Jacobians (see ``bench/results/predict.md``: minutes per thousand
  inputs on this network), which rules out tuning it.
* ``cnn_map``, ``cnn_kfac``, ``cnn_kflr`` (+ ``_mc`` / ``_glm``): the same for a LeNet-style CNN trained on
  the same 4,000 digits (cached under ``bench/cache/``).

Metrics: accuracy, NLL and ECE (15 bins) on test; AUROC of predictive entropy and of mutual information for
telling letters (``letters(500)``, notMNIST style) from test digits; the same AUROCs on the harder
``letters(500, style="mnist")`` go into ``details``. Evaluation uses 100 samples (weights for MC, logits for
GLM). Writes ``bench/results/quality.json``, ``quality.md`` and the figures of :mod:`bench.plots`.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
import time
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import curvature as cv
from bench.common import (
    CACHE_DIR,
    RESULTS_DIR,
    TrainRecipe,
    _train,
    accuracy,
    describe_device,
    load_mnist_mlp,
    resolve_device,
    write_report,
)
from curvature.data import letters
from curvature.predictive import entropy

CANONICAL = ("kfac", "kflr", "kfra", "diag")
CNN_CURVATURES = ("kfac", "kflr")
GLM_GRID = {"log10_prior": (-3.0, 5.0), "log10_n_ratio": (-2.0, 6.0), "refine_steps": 2}
MC_GRID = {"log10_prior": (2.0, 6.0), "log10_n_ratio": (-2.0, 4.0), "refine_steps": 1}
RIVAL_GRID = [10.0 ** (e / 2) for e in range(-4, 13)]
BARS = {"acc_drop_max": 0.005, "auroc_min": 0.90}


def log(message: str) -> None:
    print(f"[bench.quality] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------- data and models
@dataclass
class EvalSet:
    """Validation, test and both letter sets stacked into one tensor, so each predictive runs once."""

    x: Tensor
    y_val: Tensor
    y_test: Tensor
    n_val: int
    n_test: int
    n_ood: int

    def parts(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(validation, test, letters, MNIST-style letters)."""
        a, b = self.n_val, self.n_val + self.n_test
        c = b + self.n_ood
        return t[:a], t[a:b], t[b:c], t[c:]


def eval_set(splits, ood: Tensor, ood_hard: Tensor) -> EvalSet:
    x = torch.cat([splits.val.x, splits.test.x, ood.to(splits.val.x), ood_hard.to(splits.val.x)])
    return EvalSet(x, splits.val.y, splits.test.y, len(splits.val.y), len(splits.test.y), len(ood))


def lenet() -> nn.Sequential:
    """LeNet-5-style CNN for 1×28×28 inputs."""
    return nn.Sequential(
        nn.Conv2d(1, 6, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(256, 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, 10),
    )


def load_mnist_cnn(device: torch.device, recipe: TrainRecipe | None = None):
    """The LeNet trained on MNIST-5k (images), trained once and cached like the benchmark MLP."""
    recipe = recipe or TrainRecipe(epochs=15)
    _, splits = load_mnist_mlp(device, verbose=False)
    splits = splits.images()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model = lenet()
    key = f"mnist5k_lenet5_seed{recipe.seed}_e{recipe.epochs}_b{recipe.batch_size}_lr{recipe.lr:g}"
    path = CACHE_DIR / f"{key}.safetensors"
    if path.exists():
        model.load_state_dict(load_file(path))
        return model.to(device).eval(), splits
    model.to(device)
    start = time.perf_counter()
    _train(model, splits.train.x, splits.train.y, recipe)
    train_acc = accuracy(model, splits.train.x, splits.train.y)
    test_acc = accuracy(model, splits.test.x, splits.test.y)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(state, path, metadata={"train_acc": f"{train_acc:.4f}", "test_acc": f"{test_acc:.4f}"})
    log(f"trained {key} in {time.perf_counter() - start:.1f} s: train acc {train_acc:.4f}, test acc {test_acc:.4f}")
    return model.eval(), splits


# ----------------------------------------------------------------------------------------------- metrics
def summarise(probs: Tensor, ent: Tensor, mi: Tensor | None, ev: EvalSet) -> dict:
    """Test metrics, OOD AUROCs and the validation NLL of one predictive over the stacked evaluation set."""
    p_val, p_test, _, _ = ev.parts(probs)
    _, h_test, h_ood, h_hard = ev.parts(ent)
    row = {
        "acc": cv.accuracy(p_test, ev.y_test),
        "nll": cv.nll_classification(p_test, ev.y_test),
        "ece": cv.ece(p_test, ev.y_test, bins=15),
        "auroc_entropy": cv.auroc(h_test, h_ood),
        "auroc_mi": None,
    }
    extra = {
        "val_nll": cv.nll_classification(p_val, ev.y_val),
        "auroc_entropy_mnist_style": cv.auroc(h_test, h_hard),
        "auroc_mi_mnist_style": None,
    }
    if mi is not None:
        _, mi_test, mi_ood, mi_hard = ev.parts(mi)
        row["auroc_mi"] = cv.auroc(mi_test, mi_ood)
        extra["auroc_mi_mnist_style"] = cv.auroc(mi_test, mi_hard)
    curves = {"test_probs": p_test.cpu(), "test_y": ev.y_test.cpu(), "ood_entropy": h_ood.cpu()}
    return {"row": row, "extra": extra, "curves": curves}


def map_result(model: nn.Module, ev: EvalSet) -> dict:
    with torch.no_grad():
        probs = torch.softmax(torch.cat([model(x) for x in ev.x.split(1000)]), -1)
    res = summarise(probs, entropy(probs), None, ev)
    res["extra"]["note"] = "deterministic: mutual information is identically 0, so auroc_mi is undefined"
    return res


# ------------------------------------------------------------------------------------------------ ours
def evaluate_ours(post, ev: EvalSet, predictive: str, link: str, samples: int) -> dict:
    out = post.predict(ev.x, samples=samples, predictive=predictive, link=link)
    return summarise(out["probs"], out["entropy"], out["mutual_information"], ev)


def laplace_rows(prefix: str, model: nn.Module, splits, ev: EvalSet, curvature: str, args, results: dict) -> None:
    """Fit one curvature, tune both predictives on validation, evaluate, and add three rows to ``results``."""
    start = time.perf_counter()
    cfg = cv.LaplaceConfig(curvature=curvature, tuning="none", predictive="glm", samples=args.samples)
    post = cv.fit_laplace(model, splits.train.x, splits.train.y, splits.val.x, splits.val.y, cfg)
    fit_seconds = time.perf_counter() - start
    xv, yv = splits.val.x, splits.val.y
    candidates: dict[str, dict] = {}

    for link in ("mc", "probit"):
        t0 = time.perf_counter()
        tuned = cv.tune_validation(post, xv, yv, predictive="glm", samples=args.glm_tune_samples, link=link, **GLM_GRID)
        plain = evaluate_ours(post, ev, "glm", link, args.samples)
        null = cv.tune_null_prior(post, xv, yv, predictive="glm", samples=args.glm_tune_samples, link=link)
        res = evaluate_ours(post, ev, "glm", link, args.samples)
        res["extra"].update(
            null_prior=null,
            without_null_prior={**plain["row"], **plain["extra"]},
            predictive="glm",
            link=link,
            n_eff=post.n_eff,
            n_eff_over_n=post.n_eff / post.n_data,
            prior_precision=tuned.prior_precision,
            tuning_val_nll=tuned.objective,
            seconds=time.perf_counter() - t0,
        )
        res["extra"]["at_grid_edge"] = _at_edge(post, GLM_GRID)
        candidates[f"glm_{link}"] = res
        log(f"{prefix}{curvature} glm/{link}: val nll {res['extra']['val_nll']:.4f} ({res['extra']['seconds']:.0f} s)")
    glm_link = min(("mc", "probit"), key=lambda k: candidates[f"glm_{k}"]["extra"]["val_nll"])

    t0 = time.perf_counter()
    tuned = cv.tune_validation(post, xv, yv, predictive="mc", samples=args.mc_tune_samples, **MC_GRID)
    null = cv.tune_null_prior(post, xv, yv, predictive="mc", samples=args.mc_tune_samples)
    res = evaluate_ours(post, ev, "mc", "mc", args.samples)
    res["extra"].update(
        null_prior=null,
        predictive="mc",
        n_eff=post.n_eff,
        n_eff_over_n=post.n_eff / post.n_data,
        prior_precision=tuned.prior_precision,
        tuning_val_nll=tuned.objective,
        seconds=time.perf_counter() - t0,
    )
    res["extra"]["at_grid_edge"] = _at_edge(post, MC_GRID)
    candidates["mc"] = res
    log(f"{prefix}{curvature} mc: val nll {res['extra']['val_nll']:.4f} ({res['extra']['seconds']:.0f} s)")

    glm = candidates[f"glm_{glm_link}"]
    glm["extra"]["link_rule"] = (
        f"link chosen by validation NLL (mc {candidates['glm_mc']['extra']['val_nll']:.4f}, "
        f"probit {candidates['glm_probit']['extra']['val_nll']:.4f})"
    )
    for res in (glm, candidates["mc"]):
        res["extra"]["fit_seconds"] = fit_seconds
    results[f"{prefix}{curvature}_glm"] = glm
    results[f"{prefix}{curvature}_mc"] = candidates["mc"]
    best = min((glm, candidates["mc"]), key=lambda r: r["extra"]["val_nll"])
    results[f"{prefix}{curvature}"] = {
        **best,
        "extra": {**best["extra"], "rule": "predictive with the lower validation NLL (100 samples)"},
    }
    del post


def _at_edge(post, grid: dict) -> bool:
    """Whether the tuned ``(N_eff, τ)`` lie on or beyond the coarse grid's bounds (the refinement can step past)."""
    log_ratio = math.log10(post.n_eff / post.n_data)
    log_tau = [math.log10(t) for t in post.prior_precision.values()]
    (t_lo, t_hi), (r_lo, r_hi) = grid["log10_prior"], grid["log10_n_ratio"]
    eps = 1e-9
    return (
        log_ratio <= r_lo + eps or log_ratio >= r_hi - eps or min(log_tau) <= t_lo + eps or max(log_tau) >= t_hi - eps
    )


# ----------------------------------------------------------------------------------------------- rival
def rival_result(model: nn.Module, splits, ev: EvalSet, args) -> dict | None:
    try:
        from laplace import Laplace
    except Exception as err:  # the rival is optional
        log(f"laplace-torch unavailable ({err}); run bench/install_rivals.py")
        return None
    start = time.perf_counter()
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron")
    la.fit(DataLoader(TensorDataset(splits.train.x, splits.train.y), batch_size=512))
    fit_seconds = time.perf_counter() - start
    history = []
    with torch.no_grad():
        for tau in RIVAL_GRID:
            la.prior_precision = tau
            torch.manual_seed(0)
            probs = la(splits.val.x, pred_type="nn", link_approx="mc", n_samples=args.mc_tune_samples)
            nll = cv.nll_classification(probs, splits.val.y)
            history.append({"prior_precision": tau, "nll": nll if math.isfinite(nll) else math.inf})
        best = min(history, key=lambda h: h["nll"])
        la.prior_precision = best["prior_precision"]
        gen = torch.Generator(device=ev.x.device).manual_seed(0)
        p = la.predictive_samples(ev.x, pred_type="nn", n_samples=args.samples, generator=gen)  # (K, B, C)
    p_bar = p.mean(0)
    ent = entropy(p_bar)
    mi = (ent - entropy(p).mean(0)).clamp_min(0.0)
    res = summarise(p_bar, ent, mi, ev)
    res["extra"].update(
        predictive="nn + mc (laplace-torch)",
        prior_precision=best["prior_precision"],
        grid=history,
        fit_seconds=fit_seconds,
        seconds=time.perf_counter() - start,
    )
    edge = best["prior_precision"] in (RIVAL_GRID[0], RIVAL_GRID[-1])
    res["extra"]["at_grid_edge"] = edge
    return res


# -------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None)
    parser.add_argument("--samples", type=int, default=100, help="samples for evaluation")
    parser.add_argument("--glm-tune-samples", type=int, default=32)
    parser.add_argument("--mc-tune-samples", type=int, default=6)
    parser.add_argument("--curvatures", default=",".join(CANONICAL))
    parser.add_argument("--no-rival", action="store_true")
    parser.add_argument("--no-cnn", action="store_true")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    t_start = time.perf_counter()

    model, splits = load_mnist_mlp(device)
    ood = letters(500, seed=0).to(device)
    ood_hard = letters(500, seed=0, style="mnist").to(device)
    ev = eval_set(splits, ood, ood_hard)
    results: dict[str, dict] = {"map": map_result(model, ev)}
    log(f"map: test nll {results['map']['row']['nll']:.4f}")
    for curvature in args.curvatures.split(","):
        laplace_rows("", model, splits, ev, curvature, args, results)
    if not args.no_rival:
        log("laplace-torch kron")
        rival = rival_result(model, splits, ev, args)
        if rival is not None:
            results["laplace_torch_kron"] = rival
    if not args.no_cnn:
        cnn, cnn_splits = load_mnist_cnn(device)
        shape = cnn_splits.image_shape
        cnn_ev = eval_set(cnn_splits, ood.reshape(-1, *shape), ood_hard.reshape(-1, *shape))
        results["cnn_map"] = map_result(cnn, cnn_ev)
        for curvature in CNN_CURVATURES:
            laplace_rows("cnn_", cnn, cnn_splits, cnn_ev, curvature, args, results)

    payload = build_payload(results, device, time.perf_counter() - t_start)
    payload["letters_sha1"] = {"notmnist": _digest(ood), "mnist_style": _digest(ood_hard)}
    if not args.no_plots:
        from bench import plots

        payload["figures"] = plots.quality_figures(results, payload["best_laplace"], RESULTS_DIR, log=log)
    payload["seconds_total"] = time.perf_counter() - t_start
    md = markdown(payload)
    write_report("quality", payload, md)
    print(md)
    return 0


def build_payload(results: dict, device, seconds: float) -> dict:
    rows = {name: r["row"] for name, r in results.items()}
    details = {name: _jsonable(r["extra"]) for name, r in results.items()}
    present = [c for c in CANONICAL if c in results]
    best = min(present, key=lambda c: results[c]["extra"]["val_nll"]) if present else None
    m = rows["map"]
    rival = rows.get("laplace_torch_kron")
    checks = {}
    for c in present:
        r = rows[c]
        checks[c] = {
            "nll_better_than_map": r["nll"] < m["nll"],
            "ece_better_than_map": r["ece"] < m["ece"],
            "nll_better_than_rival": None if rival is None else r["nll"] < rival["nll"],
            "ece_better_than_rival": None if rival is None else r["ece"] < rival["ece"],
            "acc_within_0.5_points": r["acc"] >= m["acc"] - BARS["acc_drop_max"],
            "auroc_entropy_at_least_0.90": r["auroc_entropy"] >= BARS["auroc_min"],
        }
    return {
        "rows": rows,
        "details": details,
        "bar_checks": checks,
        "best_laplace": best,
        "best_rule": "canonical row with the lowest validation NLL",
        "device": describe_device(device),
        "torch": torch.__version__,
        "data": (
            "MNIST-5k test (500) vs letters A-J (500, seed 0, curvature.data.letters default notMNIST style); "
            "tuning on MNIST-5k validation (500)"
        ),
        "seconds_before_plots": seconds,
    }


def _digest(t: Tensor) -> str:
    return hashlib.sha1(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def _jsonable(extra: dict) -> dict:
    out = {}
    for k, v in extra.items():
        if isinstance(v, dict):
            out[k] = {str(a): (None if b is None else float(b)) for a, b in v.items()}
        elif isinstance(v, Tensor):
            out[k] = v.tolist()
        else:
            out[k] = v
    return out


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.4f}"


def markdown(p: dict) -> str:
    rows, details = p["rows"], p["details"]
    lines = [
        "# Predictive quality: MNIST-5k test vs letters",
        "",
        f"{p['data']}. {p['device']}, torch {p['torch']}; {p.get('seconds_total', 0):.0f} s in all.",
        "",
        "| row | acc | nll | ece | auroc_entropy | auroc_mi | val nll | predictive | N_eff / N | τ | at grid edge |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    for name, r in rows.items():
        d = details[name]
        pred = d.get("predictive", "map")
        if d.get("link"):
            pred += f" ({d['link']} link)"
        n_ratio = f"{d['n_eff_over_n']:.3g}" if "n_eff_over_n" in d else ""
        tau = d.get("prior_precision")
        if isinstance(tau, dict):
            tau = "per layer"
        elif tau is not None:
            tau = f"{tau:.3g}"
        lines.append(
            f"| {name} | {_fmt(r['acc'])} | {_fmt(r['nll'])} | {_fmt(r['ece'])} | {_fmt(r['auroc_entropy'])} | "
            f"{_fmt(r['auroc_mi'])} | {_fmt(d.get('val_nll'))} | {pred} | {n_ratio} | {tau or ''} | "
            f"{'' if 'at_grid_edge' not in d else ('yes' if d['at_grid_edge'] else 'no')} |"
        )
    lines += [
        "",
        "Second OOD set, `letters(500, style='mnist')` (glyphs normalised like MNIST digits: a harder set), and the "
        "linearised rows without the null-space prior (`tune_null_prior`, on by default in `fit_laplace`):",
        "",
        "| row | auroc_entropy (mnist-style) | auroc_mi (mnist-style) | null prior | without null prior: nll / ece / "
        "auroc_entropy / auroc_mi / val nll |",
        "|---|---:|---:|---:|---|",
    ]
    for name in rows:
        d = details[name]
        w = d.get("without_null_prior")
        plain = ""
        if w:
            plain = " / ".join(_fmt(w[k]) for k in ("nll", "ece", "auroc_entropy", "auroc_mi", "val_nll"))
        null = d.get("null_prior")
        lines.append(
            f"| {name} | {_fmt(d.get('auroc_entropy_mnist_style'))} | {_fmt(d.get('auroc_mi_mnist_style'))} | "
            f"{'' if null is None else f'{null:.3g}'} | {plain} |"
        )
    lines += [
        "",
        "Canonical rows (`kfac`, `kflr`, `kfra`, `diag`, `cnn_*`) use the predictive with the lower validation NLL; "
        "the GLM link is also chosen by validation NLL. The letters are used for evaluation only. "
        "MAP has no epistemic term, so its `auroc_mi` is undefined (–).",
        "",
        "## Against the bar (DESIGN §6)",
        "",
        "| row | NLL < MAP | ECE < MAP | NLL < laplace-torch | ECE < laplace-torch | acc within 0.5 pt "
        "| AUROC ≥ 0.90 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, c in p["bar_checks"].items():
        cells = ["–" if v is None else ("yes" if v else "no") for v in c.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    rival = details.get("laplace_torch_kron")
    if rival:
        lines += [
            "",
            f"laplace-torch: prior precision {rival['prior_precision']:.3g} chosen on validation from "
            f"{len(rival['grid'])} values (at grid edge: {rival['at_grid_edge']}); fit {rival['fit_seconds']:.0f} s.",
        ]
    if p.get("figures"):
        lines += ["", "Figures: " + ", ".join(f"`{f}`" for f in p["figures"]) + "."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

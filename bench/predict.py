"""Predictive cost on the benchmark MLP: MC and linearised (GLM) predictives against MAP forwards (the README's benchmark table).

Usage: ``python -m bench.predict [--device cuda] [--samples 100] [--rival-glm-inputs 20]``

Over 1,000 inputs (MNIST-5k test 500 + validation 500) and the 784-1024-1024-10 MLP of :mod:`bench.common`:

* ``map_seconds``: one MAP forward pass over the 1,000 inputs (median of 5);
* ``mc_seconds``: our MC predictive with K = 100 weight samples, the samples already drawn and cached on the
  posterior (median of 3); the one-off draw is ``mc_sampling_seconds`` (median of 3 fresh draws);
* ``glm_seconds``: our linearised predictive (MC over 100 logit samples) for the 1,000 inputs (median of 3);
* ``mc_over_k_forwards = mc_seconds / (K · map_seconds)``;
* laplace-torch 0.3 on a Kronecker posterior of the same model (``hessian_structure="kron"``, its
  ``CurvlinopsGGN(stochastic=True)`` backend, i.e. KFAC factors; the predictive cost does not depend on the
  factors): ``la(x, pred_type="nn", link_approx="mc", n_samples=100)`` on the 1,000 inputs (mean of two timed calls; it
  draws fresh weight samples on every call), and ``la(x, pred_type="glm", link_approx="probit")`` on 20 inputs,
  extrapolated ×50 to 1,000 inputs.

Our posterior is a KFLR fit with ``N_eff = N`` and ``τ = 1`` (no tuning: the hyper-parameters do not change the
cost). A stage breakdown of the GLM predictive and the top operators of a ``torch.profiler`` run are stored too
(and of the MC predictive when it misses its bar).
Writes ``bench/results/predict.json`` and ``bench/results/predict.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

import curvature as cv
from bench.common import describe_device, load_mnist_mlp, resolve_device, synchronize, timeit, write_report
from curvature.predictive import glm_covariance, glm_features, predictive_summary, weight_samples

MC_BAR = 1.3
GLM_BAR_SECONDS = 2.0
N_INPUTS = 1000


def log(message: str) -> None:
    print(f"[bench.predict] {message}", file=sys.stderr, flush=True)


def once(fn, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def top_operators(fn, rows: int = 6) -> list[dict[str, float | str]]:
    """The operators with the largest self CPU time in one profiled call of ``fn``."""
    from torch.profiler import profile

    with profile(record_shapes=False) as prof:
        fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return [
        {
            "op": e.key,
            "self_seconds": round(e.self_cpu_time_total / 1e6, 4),
            "share": round(e.self_cpu_time_total / total, 3),
            "calls": e.count,
        }
        for e in events[:rows]
    ]


def glm_stages(post, x: torch.Tensor, samples: int, device: torch.device) -> dict[str, float]:
    """Seconds of the GLM predictive's stages (medians of 3)."""
    from curvature.estimators.backward import backprop_vectors, record_layers

    def forward_backward():
        with torch.enable_grad(), record_layers(post.layers) as (_, outputs):
            f = post.model(x)
            c = f.shape[-1]
            eye = torch.eye(c, dtype=f.dtype, device=f.device).expand(f.shape[0], c, c)
            backprop_vectors(f, [outputs[layer.name] for layer in post.layers], eye)

    feats = glm_features(post, x)
    stages = {
        "features_total": timeit(lambda: glm_features(post, x), repeat=3, device=device),
        "forward_and_backprop": timeit(forward_backward, repeat=3, device=device),
        "covariance": timeit(lambda: glm_covariance(post, feats), repeat=3, device=device),
        "covariance_to_summary": timeit(
            lambda: predictive_summary(post, x, samples, "glm", 0, feats=feats), repeat=3, device=device
        ),
    }
    stages["eigenbasis_rotation"] = max(stages["features_total"] - stages["forward_and_backprop"], 0.0)
    return stages


def rival_timings(model, splits, x: torch.Tensor, samples: int, glm_inputs: int, device: torch.device) -> dict:
    try:
        from laplace import Laplace
        from laplace.curvature import CurvlinopsGGN
    except Exception as err:  # the rival is optional: report why it is missing
        log(f"laplace-torch unavailable ({err}); run bench/install_rivals.py")
        return {"error": f"laplace-torch unavailable: {err}"}
    loader = DataLoader(TensorDataset(splits.train.x, splits.train.y), batch_size=512)
    la = Laplace(
        model,
        "classification",
        subset_of_weights="all",
        hessian_structure="kron",
        backend=CurvlinopsGGN,
        backend_kwargs={"stochastic": True},
    )
    log("laplace-torch: fitting kron posterior")
    fit_seconds = once(lambda: la.fit(loader), device)
    la.prior_precision = 1.0
    la(x[:8], pred_type="nn", link_approx="mc", n_samples=2)  # warm-up
    log(f"laplace-torch: nn MC predictive, {samples} samples, {len(x)} inputs")
    torch.manual_seed(0)
    nn_seconds = timeit(lambda: la(x, pred_type="nn", link_approx="mc", n_samples=samples), 2, 0, device)
    log(f"laplace-torch: GLM predictive on {glm_inputs} inputs")
    la(x[:2], pred_type="glm", link_approx="probit")  # warm-up
    glm_seconds = once(lambda: la(x[:glm_inputs], pred_type="glm", link_approx="probit"), device)
    return {
        "fit_seconds": fit_seconds,
        "nn_mc_seconds": nn_seconds,
        "glm_seconds_measured": glm_seconds,
        "glm_inputs_measured": glm_inputs,
        "glm_seconds_extrapolated": glm_seconds * len(x) / glm_inputs,
        "glm_link": "probit",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--rival-glm-inputs", type=int, default=20)
    parser.add_argument("--no-rival", action="store_true", help="skip laplace-torch")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    k = args.samples

    model, splits = load_mnist_mlp(device)
    x = torch.cat([splits.test.x, splits.val.x])[:N_INPUTS]
    log(f"{len(x)} inputs on {describe_device(device)}")

    cfg = cv.LaplaceConfig(curvature="kflr", tuning="none", predictive="glm", samples=k)
    post = cv.fit_laplace(model, splits.train.x, splits.train.y, splits.val.x, splits.val.y, cfg)

    with torch.no_grad():
        map_seconds = timeit(lambda: model(x), repeat=5, device=device)
    log(f"MAP forward {map_seconds:.4f} s")

    def fresh_draw():
        post.set_hyperparameters(n_eff=post.n_eff)  # empties the sample cache
        weight_samples(post, k, int(post.metadata["seed"]))

    draws = [once(fresh_draw, device) for _ in range(3)]
    sampling_seconds = statistics.median(draws)
    log(f"drawing {k} weight samples {sampling_seconds:.3f} s")
    mc_seconds = timeit(lambda: post.predict(x, samples=k, predictive="mc"), repeat=3, device=device)
    log(f"MC predictive {mc_seconds:.3f} s")
    glm_seconds = timeit(lambda: post.predict(x, samples=k, predictive="glm"), repeat=3, device=device)
    log(f"GLM predictive {glm_seconds:.3f} s")
    mc_ratio = mc_seconds / (k * map_seconds)

    payload: dict = {
        "device": describe_device(device),
        "torch": torch.__version__,
        "model": "784-1024-1024-10 ReLU MLP",
        "inputs": len(x),
        "samples": k,
        "posterior": "kflr, exact damping, N_eff = N, tau = 1",
        "map_seconds": map_seconds,
        "mc_seconds": mc_seconds,
        "mc_sampling_seconds": sampling_seconds,
        "glm_seconds": glm_seconds,
        "mc_over_k_forwards": mc_ratio,
        "mc_with_sampling_over_k_forwards": (mc_seconds + sampling_seconds) / (k * map_seconds),
        "bars": {"mc_over_k_forwards": MC_BAR, "glm_seconds": GLM_BAR_SECONDS},
        "meets": {"mc_over_k_forwards": mc_ratio <= MC_BAR, "glm_seconds": glm_seconds <= GLM_BAR_SECONDS},
    }
    if not payload["meets"]["mc_over_k_forwards"]:
        payload["mc_profile"] = top_operators(lambda: post.predict(x, samples=k, predictive="mc"))
    log("GLM stage breakdown and profile")
    payload["glm_stages_seconds"] = glm_stages(post, x, k, device)
    payload["glm_profile"] = top_operators(lambda: post.predict(x, samples=k, predictive="glm"))

    rival = {} if args.no_rival else rival_timings(model, splits, x, k, args.rival_glm_inputs, device)
    if "nn_mc_seconds" in rival:
        rival["nn_mc_over_k_forwards"] = rival["nn_mc_seconds"] / (k * map_seconds)
    payload["rival"] = {"library": "laplace-torch 0.3", **rival} if rival else {}

    write_report("predict", payload, markdown(payload))
    print(markdown(payload))
    return 0


def markdown(p: dict) -> str:
    r = p.get("rival") or {}
    measured = r.get("glm_inputs_measured", 1)
    lines = [
        "# Predictive cost",
        "",
        f"{p['model']}, {p['inputs']} inputs (MNIST-5k test 500 + validation 500), K = {p['samples']}; "
        f"{p['device']}, torch {p['torch']}. Our posterior: {p['posterior']}.",
        "",
        "| predictive | ours (s) | ours ÷ K MAP forwards | laplace-torch (s) | laplace-torch ÷ K MAP forwards | bar |",
        "|---|---:|---:|---:|---:|---|",
        f"| MAP forward | {p['map_seconds']:.4f} |  |  |  |  |",
        f"| MC, K = {p['samples']} (samples cached) | {p['mc_seconds']:.3f} | {p['mc_over_k_forwards']:.2f} | "
        f"{_f(r.get('nn_mc_seconds'))} | {_f(r.get('nn_mc_over_k_forwards'), '.2f')} | ≤ {MC_BAR}× |",
        f"| MC one-off weight sampling | {p['mc_sampling_seconds']:.3f} |  |  |  |  |",
        f"| MC incl. drawing the samples | {p['mc_seconds'] + p['mc_sampling_seconds']:.3f} | "
        f"{p['mc_with_sampling_over_k_forwards']:.2f} | (always redraws) |  |  |",
        f"| GLM, 1,000 inputs | {p['glm_seconds']:.3f} |  | {_f(r.get('glm_seconds_extrapolated'), '.1f')}"
        f" (measured on {measured} inputs, ×{p['inputs'] // max(1, measured)}) "
        f"|  | ≤ {GLM_BAR_SECONDS:g} s |",
        "",
        f"laplace-torch: `la(x, pred_type='nn', link_approx='mc', n_samples={p['samples']})` redraws its weight "
        "samples on every call (mean of two timed calls); its GLM uses `link_approx='probit'` and is extrapolated "
        "linearly from the measured inputs. Its kron posterior uses the `CurvlinopsGGN(stochastic=True)` backend "
        f"(fit {_f(r.get('fit_seconds'), '.1f')} s, not part of the predictive timings).",
        "",
        f"Bars met: MC {p['meets']['mc_over_k_forwards']}, GLM {p['meets']['glm_seconds']}.",
    ]
    if "glm_stages_seconds" in p:
        s = p["glm_stages_seconds"]
        lines += [
            "",
            "## Where the GLM time goes (medians of 3; profile of one call)",
            "",
            "| stage | seconds |",
            "|---|---:|",
            *(f"| {k} | {v:.3f} |" for k, v in s.items()),
            "",
            "| operator (torch.profiler, one call) | self seconds | share | calls |",
            "|---|---:|---:|---:|",
            *(f"| {o['op']} | {o['self_seconds']:.3f} | {o['share']:.0%} | {o['calls']} |" for o in p["glm_profile"]),
        ]
    if "mc_profile" in p:
        lines += [
            "",
            "## Where the MC time goes",
            "",
            "| operator (torch.profiler, one call) | self seconds | share | calls |",
            "|---|---:|---:|---:|",
            *(f"| {o['op']} | {o['self_seconds']:.3f} | {o['share']:.0%} | {o['calls']} |" for o in p["mc_profile"]),
        ]
    return "\n".join(lines)


def _f(value, fmt: str = ".3f") -> str:
    return "n/a" if value is None else format(value, fmt)


if __name__ == "__main__":
    sys.exit(main())

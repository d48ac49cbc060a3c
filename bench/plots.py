"""Figures of the quality benchmark (used by :mod:`bench.quality`; ``python -m bench.plots`` redraws the toy one).

* ``reliability.png``: reliability diagram on MNIST-5k test, MAP against the best Laplace row.
* ``letters_entropy.png``: thesis Fig. 5.2 — the fraction of letters whose predictive entropy is at least ``h``,
  MAP against the Laplace variants (MLP and CNN panels).
* ``toy_regression.png``: thesis Fig. 5.1 — 20 points of the toy cubic, a 1-7-7-1 tanh network, its MAP line
  and predictive mean ± 1, 2, 3 standard deviations (total: epistemic + the known noise σ = 3) under KF-Laplace
  (KFLR) and under a full dense Laplace built from :func:`curvature.estimators.exact_ggn`. Both posteriors have
  ``(N_eff, τ)`` chosen on 20 separate validation points drawn from the same distribution (thesis §5.2.1).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.func import vmap  # noqa: E402

import curvature as cv  # noqa: E402
from curvature.data import toy_regression  # noqa: E402
from curvature.estimators import flatten_matrices, functional_model, layer_matrices, unflatten_vector  # noqa: E402
from curvature.layers import find_layers  # noqa: E402

COLOURS = {
    "map": "tab:red",
    "kfac": "tab:blue",
    "kflr": "tab:green",
    "kfra": "tab:purple",
    "diag": "tab:orange",
    "laplace_torch_kron": "tab:gray",
}


def _colour(name: str) -> str:
    return COLOURS.get(name.removeprefix("cnn_"), "tab:brown")


# ------------------------------------------------------------------------------------------- reliability
def reliability_figure(curves: dict[str, tuple[Tensor, Tensor]], path: Path, bins: int = 15) -> None:
    """``curves``: name -> (test probabilities, labels)."""
    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 4.2), sharey=True)
    axes = np.atleast_1d(axes)
    for ax, (name, (probs, y)) in zip(axes, curves.items(), strict=True):
        rel = cv.metrics.reliability(probs, y, bins=bins)
        lower, upper = np.array(rel["lower"]), np.array(rel["upper"])
        acc = np.array(rel["accuracy"], dtype=float)
        conf = np.array(rel["confidence"], dtype=float)
        count = np.array(rel["count"])
        ok = count > 0
        ax.bar(
            lower[ok],
            acc[ok],
            width=(upper - lower)[ok],
            align="edge",
            color=_colour(name),
            alpha=0.7,
            edgecolor="black",
            linewidth=0.5,
            label="accuracy",
        )
        ax.plot(conf[ok], acc[ok], "o", color="black", markersize=3, label="(mean confidence, accuracy)")
        ax.plot([0, 1], [0, 1], "--", color="black", linewidth=1, label="perfect calibration")
        ece = cv.ece(probs, y, bins=bins)
        ax.set_title(f"{name}: ECE {ece:.4f}")
        ax.set_xlabel("confidence (max probability)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        for lo, hi, n, a in zip(lower[ok], upper[ok], count[ok], acc[ok], strict=True):
            ax.text((lo + hi) / 2, min(a + 0.02, 0.95), str(n), ha="center", fontsize=6)
    axes[0].set_ylabel("accuracy (bar labels: points per bin)")
    axes[0].legend(loc="upper left", fontsize=7)
    fig.suptitle("Reliability on MNIST-5k test (500 digits, 15 bins)")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ entropy iCDF
def entropy_icdf_figure(panels: dict[str, dict[str, Tensor]], path: Path, n_classes: int = 10) -> None:
    """``panels``: title -> {row name -> predictive entropies on the letters}."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), sharey=True)
    axes = np.atleast_1d(axes)
    h_max = math.log(n_classes)
    grid = np.linspace(0, h_max, 300)
    for ax, (title, entropies) in zip(axes, panels.items(), strict=True):
        order = sorted(entropies, key=lambda n: n.endswith("map"))  # MAP drawn last, on top
        for name in order:
            h = entropies[name]
            h = np.sort(h.double().numpy())
            frac = 1.0 - np.searchsorted(h, grid, side="left") / len(h)
            style = "--" if name.endswith("map") else "-"
            ax.plot(grid, frac, style, color=_colour(name), label=name, linewidth=1.6)
        ax.set_title(title)
        ax.set_xlabel("entropy h (nats)")
        ax.set_xlim(0, h_max)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("fraction of letters with entropy ≥ h")
    fig.suptitle("Predictive entropy on out-of-distribution letters A–J (higher curve = more uncertain)")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def quality_figures(results: dict, best: str | None, outdir: Path, log: Callable[[str], None] = print) -> list[str]:
    """All three figures from the rows of :mod:`bench.quality`; returns the written file names."""
    outdir.mkdir(parents=True, exist_ok=True)
    written = []
    rel = {"map": _pair(results["map"])}
    if best is not None:
        rel[best] = _pair(results[best])
    if "laplace_torch_kron" in results:
        rel["laplace_torch_kron"] = _pair(results["laplace_torch_kron"])
    reliability_figure(rel, outdir / "reliability.png")
    written.append("reliability.png")

    mlp = [n for n in ("map", "default", "kfac", "kflr", "kfra", "diag", "laplace_torch_kron") if n in results]
    panels = {"784-1024-1024-10 MLP": {n: results[n]["curves"]["ood_entropy"] for n in mlp}}
    cnn = [n for n in ("cnn_map", "cnn_default", "cnn_kfac", "cnn_kflr") if n in results]
    if cnn:
        panels["LeNet CNN"] = {n: results[n]["curves"]["ood_entropy"] for n in cnn}
    entropy_icdf_figure(panels, outdir / "letters_entropy.png")
    written.append("letters_entropy.png")

    log("toy regression figure")
    toy_regression_figure(outdir / "toy_regression.png")
    written.append("toy_regression.png")
    return written


def _pair(result: dict) -> tuple[Tensor, Tensor]:
    return result["curves"]["test_probs"], result["curves"]["test_y"]


# ---------------------------------------------------------------------------------------- toy regression
NOISE_SD = 3.0  # the toy data's known noise, y ~ N(x³, 3²); the 78-parameter net overfits 20 points otherwise


def toy_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, 7), nn.Tanh(), nn.Linear(7, 7), nn.Tanh(), nn.Linear(7, 1))


def train_toy(x: Tensor, y: Tensor, seed: int = 0, steps: int = 4000, weight_decay: float = 2e-2) -> nn.Sequential:
    """MAP fit of the 1-7-7-1 tanh network: full-batch Adam on the squared error with an L2 prior term."""
    with torch.random.fork_rng(devices=[]):
        net = toy_net(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: extra threads only add overhead
    try:
        opt = torch.optim.Adam(net.parameters(), lr=0.02, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.mse_loss(net(x), y).backward()
            opt.step()
            sched.step()
    finally:
        torch.set_num_threads(threads)
    return net.eval()


class DenseLaplace:
    """Full-covariance Laplace ``N(θ*, (N_eff/N · GGN + τ I)⁻¹)`` of a tiny network, by one eigendecomposition."""

    def __init__(self, net: nn.Module, x: Tensor, y: Tensor, likelihood) -> None:
        self.layers = find_layers(net)
        self.fn = functional_model(net, self.layers)
        self.theta = flatten_matrices(self.layers, layer_matrices(self.layers))
        ggn = cv.exact_ggn(net, x, y, likelihood, self.layers).double()
        self.evals, self.evecs = torch.linalg.eigh(ggn)
        self.evals = self.evals.clamp_min(0.0)
        self.n = x.shape[0]
        self.sigma = likelihood.sigma

    def outputs(self, x: Tensor, z: Tensor, n_eff: float, tau: float) -> Tensor:
        """Network outputs (K, B) for weight samples built from standard normals ``z`` (K, P)."""
        scale = (n_eff / self.n * self.evals + tau).rsqrt()
        thetas = (self.theta.double() + (z.double() * scale) @ self.evecs.T).to(self.theta.dtype)

        def run(th):
            return self.fn(unflatten_vector(self.layers, th), x)[:, 0]

        with torch.no_grad():
            return vmap(run)(thetas)

    def tune(self, x_val: Tensor, y_val: Tensor, z: Tensor) -> tuple[float, float, float]:
        """Validation-NLL grid search over ``log10(N_eff/N) ∈ [-4, 6]`` and ``log10 τ ∈ [-3, 5]`` (half decades)."""
        best = (math.inf, float(self.n), 1.0)
        for lr in np.arange(-4.0, 6.01, 0.5):
            for lt in np.arange(-3.0, 5.01, 0.5):
                n_eff, tau = self.n * 10.0**lr, 10.0**lt
                f = self.outputs(x_val, z, n_eff, tau)
                nll = cv.nll_gaussian(f.mean(0)[:, None], (f.var(0) + self.sigma**2)[:, None], y_val)
                if nll < best[0]:
                    best = (nll, n_eff, tau)
        return best


def toy_regression_figure(path: Path, samples: int = 1000) -> dict:
    """Draw thesis Fig. 5.1 for KF-Laplace (KFLR) and full Laplace; returns the chosen hyper-parameters."""
    torch.manual_seed(0)
    x, y = toy_regression(20, seed=0)
    x_val, y_val = toy_regression(20, seed=1)
    net = train_toy(x, y)
    grid = torch.linspace(-6, 6, 241).unsqueeze(1)
    with torch.no_grad():
        f_map = net(grid)[:, 0]

    cfg = cv.LaplaceConfig(
        curvature="kflr",
        likelihood="regression",
        tuning="validation",
        predictive="mc",
        samples=samples,
        sigma=NOISE_SD,
    )
    post = cv.fit_laplace(net, x, y, x_val, y_val, cfg)
    kf = post.predict(grid, samples=samples, predictive="mc")
    kf_mean, kf_sd = kf["mean"][:, 0], kf["variance"][:, 0].sqrt()
    sigma = post.likelihood.sigma

    dense = DenseLaplace(net, x, y, post.likelihood)
    z = torch.randn(samples, dense.theta.numel(), generator=torch.Generator().manual_seed(0))
    d_nll, d_n, d_tau = dense.tune(x_val, y_val, z[:200])
    f = dense.outputs(grid, z, d_n, d_tau)
    full_mean, full_sd = f.mean(0), (f.var(0) + sigma**2).sqrt()

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), sharey=True)
    panels = [
        (f"KF-Laplace (KFLR) [R]: N_eff/N = {post.n_eff / post.n_data:.3g}, τ = {_tau(post):.3g}", kf_mean, kf_sd),
        (f"Full Laplace (exact GGN) [R]: N_eff/N = {d_n / dense.n:.3g}, τ = {d_tau:.3g}", full_mean, full_sd),
    ]
    g = grid[:, 0].numpy()
    for ax, (title, mean, sd) in zip(axes, panels, strict=True):
        mean, sd = mean.numpy(), sd.numpy()
        for k, alpha in ((3, 0.15), (2, 0.25), (1, 0.35)):
            ax.fill_between(g, mean - k * sd, mean + k * sd, color="tab:blue", alpha=alpha, linewidth=0)
        ax.plot(g, g**3, color="black", linewidth=1, label="x³ (noiseless)")
        ax.plot(g, f_map.numpy(), color="tab:red", linewidth=1.5, label="MAP network")
        ax.plot(g, mean, color="tab:blue", linewidth=1.5, label="predictive mean")
        ax.scatter(x[:, 0], y[:, 0], color="black", s=14, zorder=5, label="training points")
        ax.set_title(title, fontsize=10)
        ax.set_xlim(-6, 6)
        ax.set_ylim(-150, 150)
        ax.set_xlabel("x")
        ax.axvspan(-6, -4, color="gray", alpha=0.08)
        ax.axvspan(4, 6, color="gray", alpha=0.08)
    axes[0].set_ylabel("y")
    axes[0].legend(loc="upper left", fontsize=8)
    fig.suptitle(
        f"Toy regression (thesis Fig. 5.1): 1-7-7-1 tanh net, 20 points, σ = {sigma:.2f}; "
        "shades: mean ± 1, 2, 3 predictive sd (noise included); grey: outside the data range",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return {
        "kf": {"n_eff": post.n_eff, "prior_precision": _tau(post), "val_nll": post.metadata.get("validation_nll")},
        "full": {"n_eff": d_n, "prior_precision": d_tau, "val_nll": d_nll},
        "sigma": sigma,
    }


def _tau(post) -> float:
    return float(np.mean(list(post.prior_precision.values())))


if __name__ == "__main__":
    from bench.common import RESULTS_DIR

    info = toy_regression_figure(RESULTS_DIR / "toy_regression.png")
    print(info, file=sys.stderr)

"""Predictive distributions of a Laplace posterior: Monte Carlo over weights, or linearised (GLM).

* MC (thesis eq. 5.9): ``p(y|x) ≈ (1/K) Σ_k p(y|x, θ_k)``, ``θ_k ~ q(θ)``. The K networks run as one batched
  (``vmap``-ed) forward pass; the weight samples for a given ``(K, seed)`` are drawn once and kept, so repeated
  predictions cost K forward passes and nothing more.
* GLM: ``f(x, θ) ≈ f(x, θ*) + J (θ − θ*)``, so logits are Gaussian with mean ``f(x, θ*)`` and covariance
  ``Σ_l J_l P_l⁻¹ J_lᵀ``. In the eigenbasis of ``P_l`` this is, for a layer applied once per example,
  ``Σ_{o,i} (B U_G)_{co} (B U_G)_{do} (â U_A)_i² / Λ_{oi}`` with ``B = ∂f/∂h_l`` — no Jacobian over parameters is
  formed. The class probabilities then come from MC over logits or the probit approximation.

Per input we report ``H[p̄]`` (``entropy``), ``E_k H[p_k]`` (``expected_entropy``, aleatoric) and their difference
(``mutual_information``, epistemic); for regression the mean and the aleatoric / epistemic variances.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import functional_call, vmap

from .estimators.backward import backprop_vectors, record_layers
from .likelihoods import Gaussian

OOD_SCORES = ("entropy", "mutual_information", "max_prob")
PREDICTIVES = ("mc", "glm")
BANK_BYTES = 2 * 1024**3
# Elements of the widest activation per chunk of weight samples. Small enough for the chunk's activations to
# stay in cache: K separate-sized products then run at the speed of K plain forward passes.
_ACTIVATION_BUDGET = 2_500_000


# --------------------------------------------------------------------------------------------------- helpers
def entropy(p: Tensor, dim: int = -1) -> Tensor:
    """Shannon entropy in nats."""
    return -(p * torch.log(p.clamp_min(1e-30))).sum(dim)


def _stacked_params(post, weights: dict[str, Tensor]) -> dict[str, Tensor]:
    params = {}
    for layer in post.layers:
        w, b = layer.handler.split_matrix(layer.module, weights[layer.name])
        prefix = f"{layer.name}." if layer.name else ""
        params[prefix + "weight"] = w
        if b is not None:
            params[prefix + "bias"] = b
    return params


def batched_forward(post, weights: dict[str, Tensor], x: Tensor) -> Tensor:
    """Run the network with K weight sets at once: (K, B, C) outputs."""
    model = post.model
    stacked = _stacked_params(post, weights)
    fixed = {k: v.detach() for k, v in model.named_parameters() if k not in stacked}
    fixed.update(dict(model.named_buffers()))

    def run(params):
        return functional_call(model, {**fixed, **params}, (x,))

    with torch.no_grad():
        out = vmap(run)(stacked)
    return out.unsqueeze(-1) if out.dim() == 2 else out


def _widest(post, batch: int) -> int:
    return batch * max(max(b.mean.shape) for b in post.blocks.values())


def weight_samples(post, k: int, seed: int) -> dict[str, Tensor]:
    """The posterior's K weight samples for ``seed``, cached on the posterior when they fit in memory."""
    return post.cached_samples(k, seed, BANK_BYTES)


# -------------------------------------------------------------------------------------------------- MC
def mc_outputs(post, x: Tensor, samples: int, seed: int) -> Tensor:
    """Network outputs under ``samples`` posterior weight draws: (K, B, C)."""
    return outputs_under(post, weight_samples(post, samples, seed), x)


def outputs_under(post, weights: dict[str, Tensor], x: Tensor) -> Tensor:
    """Network outputs under the given weight sets ``{layer: (K, out, in+1)}``: (K, B, C), in chunks of sets."""
    k = next(iter(weights.values())).shape[0]
    chunk = max(1, _ACTIVATION_BUDGET // max(1, _widest(post, x.shape[0])))
    outs = []
    for i in range(0, k, chunk):
        outs.append(batched_forward(post, {n: w[i : i + chunk] for n, w in weights.items()}, x))
    return torch.cat(outs, 0)


# ------------------------------------------------------------------------------------------------- GLM
@dataclass
class GLMFeatures:
    """Per-input pieces of the linearised predictive that do not depend on ``(N_eff, τ)``."""

    f: Tensor  # (B, C) MAP outputs
    rotated: dict[str, tuple[Tensor, Tensor | None]]
    # T = 1: (B U_G (C, B, out), (â U_A)² (B, in)); T > 1: (J̃ (B, C, out, in), None)

    def rows(self, index: Tensor) -> GLMFeatures:
        """The features of a subset of the inputs (``index`` into the batch)."""
        rotated = {
            name: (g[:, index], a2[index]) if a2 is not None else (g[index], None)
            for name, (g, a2) in self.rotated.items()
        }
        return GLMFeatures(self.f[index], rotated)


def glm_features(post, x: Tensor) -> GLMFeatures:
    """Backpropagate the C output directions once and rotate into each layer's eigenbasis."""
    model = post.model
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad(), record_layers(post.layers) as (inputs, outputs):
            f = model(x)
            if f.dim() == 1:
                f = f.unsqueeze(-1)
            c = f.shape[-1]
            eye = torch.eye(c, dtype=f.dtype, device=f.device).expand(f.shape[0], c, c)
            pulled = backprop_vectors(f, [outputs[layer.name] for layer in post.layers], eye)
    finally:
        model.train(was_training)
    rotated = {}
    for layer, g in zip(post.layers, pulled, strict=True):
        block = post.blocks[layer.name]
        a = layer.handler.input_rows(layer.module, inputs[layer.name])  # (B, T, in)
        g = layer.handler.output_rows(layer.module, g.detach())  # (C, B, T, out)
        a, g = block.rotate_inputs(a), block.rotate_outputs(g)
        if a.shape[1] == 1:
            rotated[layer.name] = (g[:, :, 0], a[:, 0] ** 2)
        else:
            # b example, c output, t location, o out, i in
            rotated[layer.name] = (torch.einsum("cbto,bti->bcoi", g, a), None)
    return GLMFeatures(f.detach(), rotated)


def glm_covariance(post, feats: GLMFeatures, n_eff: float | None = None, prior: dict[str, float] | None = None):
    """Logit covariance ``Σ_l J_l P_l⁻¹ J_lᵀ`` (B, C, C) for the given hyper-parameters."""
    b, c = feats.f.shape
    cov = feats.f.new_zeros(b, c, c)
    for name, (g, a2) in feats.rotated.items():
        cov += layer_covariance(g, a2, 1.0 / post.eigenvalues(name, n_eff, None if prior is None else prior[name]))
    return cov


def layer_covariance(g: Tensor, a2: Tensor | None, weight: Tensor) -> Tensor:
    """One layer's ``Σ_k φ_k φ_kᵀ w_k`` (B, C, C) from its GLM features and a weight per eigen-direction (out, in).

    ``a2`` given (a layer applied once per example): ``Σ_o g_o g_oᵀ Σ_i a_i² w_oi``; otherwise ``g`` holds the
    per-direction Jacobians (B, C, out, in).
    """
    if a2 is not None:
        m = a2 @ weight.T  # (B, out)
        gb = g.transpose(0, 1)  # (B, C, out)
        return (gb * m.unsqueeze(1)) @ gb.transpose(-1, -2)
    flat = g.flatten(2)  # (B, C, out·in)
    return (flat * weight.reshape(1, 1, -1)) @ flat.transpose(-1, -2)


def _logit_samples(mean: Tensor, cov: Tensor, samples: int, seed: int) -> Tensor:
    c = mean.shape[-1]
    # Factor each covariance scaled to unit mean variance: far-out inputs have variances of 1e30 and more, where
    # an unscaled Cholesky or eigh loses all precision (or fails to converge).
    scale = cov.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)[:, None, None]
    unit = cov / scale
    eye = torch.eye(c, dtype=cov.dtype, device=cov.device)
    chol, info = torch.linalg.cholesky_ex(unit + 1e-9 * eye)
    bad = info != 0
    if bool(bad.any()):
        s, u = torch.linalg.eigh(unit[bad].double())
        chol[bad] = (u * s.clamp_min(0).sqrt().unsqueeze(-2)).to(chol.dtype)
    chol = chol * scale.sqrt()
    # One set of K standard normals shared by every input (as the MC predictive shares its K weight samples), so
    # an input's prediction does not depend on the batch it arrives in or on its position there.
    gen = torch.Generator(device=mean.device).manual_seed(seed)
    # In antithetic pairs (z, −z), as the weight samples (LaplacePosterior.sample): the first-order MC noise of
    # the average cancels, so a near tie between two classes does not flip on the draws.
    z = torch.randn((samples + 1) // 2, c, dtype=mean.dtype, device=mean.device, generator=gen)
    z = torch.cat([z, -z])[:samples]
    # In float64: a narrow posterior's offsets (1e-6 of the logits and less) would round away in float32, and
    # the mutual information of the summary is a difference of nearly equal entropies.
    return mean.double() + torch.einsum("bcd,kd->kbc", chol.double(), z.double())


# ----------------------------------------------------------------------------------------------- summaries
def classification_summary(
    logits: Tensor, probs_override: Tensor | None = None, dtype: torch.dtype | None = None
) -> dict[str, Tensor]:
    """From K logit samples (K, B, C): mean probabilities, entropies and mutual information.

    Computed in float64 and returned in ``dtype`` (default: the logits'). The mutual information is the
    difference of two nearly equal entropies when the posterior is narrow: in float32 it would be round-off
    below about 1e-7 of the entropy, and its ranking of inputs (the OOD score) noise.
    """
    dtype = dtype or logits.dtype
    p = torch.softmax(logits.double(), -1)
    p_bar = p.mean(0) if probs_override is None else probs_override.double()
    h = entropy(p_bar)
    eh = entropy(p).mean(0)
    out = {
        "probs": p_bar,
        "entropy": h,
        "expected_entropy": eh,
        "mutual_information": (h - eh).clamp_min(0.0),
        "max_prob": p_bar.max(-1).values,
    }
    return {k: v.to(dtype) for k, v in out.items()}


def regression_summary(mean: Tensor, epistemic: Tensor, sigma: float) -> dict[str, Tensor]:
    aleatoric = torch.full_like(mean, sigma**2)
    total = aleatoric + epistemic
    h = 0.5 * torch.log(2 * math.pi * math.e * total).sum(-1)
    eh = 0.5 * torch.log(2 * math.pi * math.e * aleatoric).sum(-1)
    return {
        "mean": mean,
        "variance": total,
        "aleatoric_variance": aleatoric,
        "epistemic_variance": epistemic,
        "entropy": h,
        "expected_entropy": eh,
        # h − eh without the cancellation: ½ Σ log(1 + epistemic / aleatoric)
        "mutual_information": 0.5 * torch.log1p((epistemic / aleatoric).clamp_min(0.0)).sum(-1),
    }


def _with_fallback(summary: dict[str, Tensor], bad: Tensor, regression: bool) -> dict[str, Tensor]:
    """Replace the rows ``bad`` (inputs whose outputs or covariances are not finite) by the most uncertain answer.

    Classification: uniform probabilities, all of their entropy epistemic; regression: mean 0 with a huge
    (finite) epistemic variance. Every value stays finite, so a response never carries NaN or infinity, and the
    row's scores take their largest values, so the input is flagged.
    """
    out = dict(summary)
    out["fallback"] = bad
    if not bool(bad.any()):
        return out
    rows = bad.unsqueeze(-1)
    if regression:
        big = torch.full_like(out["variance"], 1e30)
        out["mean"] = torch.where(rows, torch.zeros_like(out["mean"]), out["mean"])
        out["epistemic_variance"] = torch.where(rows, big, out["epistemic_variance"])
        out["variance"] = out["aleatoric_variance"] + out["epistemic_variance"]
        h = 0.5 * torch.log(2 * math.pi * math.e * out["variance"]).sum(-1)
        out["entropy"] = h
        out["mutual_information"] = (h - out["expected_entropy"]).clamp_min(0.0)
        return out
    c = out["probs"].shape[-1]
    uniform = torch.full_like(out["probs"], 1.0 / c)
    out["probs"] = torch.where(rows, uniform, out["probs"])
    log_c = torch.full_like(out["entropy"], math.log(c))
    out["entropy"] = torch.where(bad, log_c, out["entropy"])
    out["expected_entropy"] = torch.where(bad, torch.zeros_like(log_c), out["expected_entropy"])
    out["mutual_information"] = torch.where(bad, log_c, out["mutual_information"])
    out["max_prob"] = torch.where(bad, uniform[..., 0], out["max_prob"])
    return out


def _finite_rows(t: Tensor) -> Tensor:
    """Rows (first dimension) of ``t`` whose entries are all finite."""
    return torch.isfinite(t.reshape(t.shape[0], -1)).all(-1)


def ood_score_of(summary: dict[str, Tensor], score: str) -> Tensor:
    """Higher means more out-of-distribution."""
    if score == "max_prob":
        if "max_prob" not in summary:
            raise ValueError("max_prob is defined for classification only.")
        return 1.0 - summary["max_prob"]
    if score not in OOD_SCORES:
        raise ValueError(f"Unknown OOD score {score!r}; choose from {OOD_SCORES}.")
    return summary[score]


def predictive_summary(
    post,
    x: Tensor,
    samples: int,
    predictive: str,
    seed: int,
    link: str = "mc",
    n_eff: float | None = None,
    prior: dict[str, float] | None = None,
    feats: GLMFeatures | None = None,
) -> dict[str, Tensor]:
    """Predictive summaries for one batch (no OOD flags)."""
    regression = isinstance(post.likelihood, Gaussian)
    if predictive == "mc":
        if n_eff is not None or prior is not None:
            raise ValueError("MC predictive uses the posterior's own hyper-parameters.")
        outs = mc_outputs(post, x, samples, seed)
        ok = _finite_rows(outs.transpose(0, 1))
        outs = torch.where(ok.view(1, -1, *([1] * (outs.dim() - 2))), outs, torch.zeros_like(outs))
        if regression:
            summary = regression_summary(outs.mean(0), outs.var(0, unbiased=False), post.likelihood.sigma)
        else:
            summary = classification_summary(outs)
        return _with_fallback(summary, ~ok, regression)
    if predictive != "glm":
        raise ValueError(f"predictive must be one of {PREDICTIVES}, got {predictive!r}.")
    if link not in ("mc", "probit"):
        raise ValueError(f"link must be 'mc' or 'probit', got {link!r}.")
    feats = glm_features(post, x) if feats is None else feats
    return glm_summary(post, feats.f, glm_covariance(post, feats, n_eff, prior), samples, seed, link)


def glm_summary(post, f: Tensor, cov: Tensor, samples: int, seed: int, link: str = "mc") -> dict[str, Tensor]:
    """Predictive summaries from the linearised network's logit mean ``f`` (B, C) and covariance (B, C, C)."""
    regression = isinstance(post.likelihood, Gaussian)
    ok = _finite_rows(f) & _finite_rows(cov)
    f = torch.where(ok.unsqueeze(-1), f, torch.zeros_like(f))
    cov = torch.where(ok.view(-1, 1, 1), cov, torch.zeros_like(cov))
    if regression:
        summary = regression_summary(f, cov.diagonal(dim1=-2, dim2=-1), post.likelihood.sigma)
        return _with_fallback(summary, ~ok, regression)
    logits = _logit_samples(f, cov, samples, seed)
    probs = None
    if link == "probit":
        kappa = 1.0 / torch.sqrt(1.0 + math.pi / 8.0 * cov.diagonal(dim1=-2, dim2=-1))
        probs = torch.softmax(f * kappa, -1)
    summary = classification_summary(logits, probs, dtype=f.dtype)
    ok = ok & _finite_rows(summary["probs"]) & torch.isfinite(summary["mutual_information"])
    return _with_fallback(summary, ~ok, regression)


def predict(
    post,
    x: Tensor,
    samples: int = 100,
    predictive: str = "mc",
    ood_score: str | None = None,
    seed: int | None = None,
    link: str | None = None,
    batch_size: int = 1024,
) -> dict[str, Tensor]:
    """Predictive distribution and OOD flags for a batch of inputs.

    Args:
        post: a :class:`~curvature.posterior.LaplacePosterior`.
        x: inputs (B, ...) in the model's input layout.
        samples: MC samples (weights for ``"mc"``, logits for ``"glm"``).
        predictive: ``"mc"`` or ``"glm"`` (default: the one the fit was configured for).
        ood_score: ``"entropy"``, ``"mutual_information"`` or ``"max_prob"`` (default: the calibrated one).
        seed: random seed (default: the posterior's, so repeated calls agree).
        link: ``"mc"`` or ``"probit"`` for the GLM class probabilities (default: the one the fit chose,
            metadata key ``link``, else ``"mc"``).
    Returns:
        Tensors with the batch first; ``ood`` is a bool tensor, ``ood_threshold`` a 0-d tensor (NaN when
        the score was never calibrated, and then no input is flagged).
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}.")
    predictive = predictive or post.default_predictive
    if x.shape[0] == 0:
        raise ValueError("Empty batch.")
    seed = int(post.metadata.get("seed", 0)) if seed is None else int(seed)
    link = link or str(post.metadata.get("link", "mc"))
    score = ood_score or str(post.metadata.get("ood_score", "entropy"))
    if score not in OOD_SCORES:
        raise ValueError(f"Unknown OOD score {score!r}; choose from {OOD_SCORES}.")
    device, dtype = post.blocks[post.layers[0].name].mean.device, post.blocks[post.layers[0].name].mean.dtype
    x = x.to(device=device, dtype=dtype)
    # Non-finite inputs never reach the network: they are answered by the fallback (see _with_fallback).
    finite_in = _finite_rows(x)
    x = torch.where(finite_in.view(-1, *([1] * (x.dim() - 1))), x, torch.zeros_like(x))
    parts = [
        predictive_summary(post, x[i : i + batch_size], samples, predictive, seed, link)
        for i in range(0, x.shape[0], batch_size)
    ]
    out = {k: torch.cat([p[k] for p in parts], 0) for k in parts[0]}
    out = _with_fallback(out, out["fallback"] | ~finite_in, isinstance(post.likelihood, Gaussian))
    out["out_of_range"] = out_of_range(post, x) | ~finite_in
    out["ood_score"] = ood_score_of(out, score)
    if "probs" in out:  # inputs out of range score the score's largest value (uniform probabilities)
        c = out["probs"].shape[-1]
        top = 1.0 - 1.0 / c if score == "max_prob" else math.log(c)
        out["ood_score"] = torch.where(out["out_of_range"], torch.full_like(out["ood_score"], top), out["ood_score"])
    threshold = post.ood_table.get(predictive, {}).get(score, math.nan)
    out["ood_threshold"] = torch.tensor(threshold, dtype=torch.float64)
    above = (
        out["ood_score"].double() > threshold
        if not math.isnan(threshold)
        else torch.zeros_like(out["entropy"], dtype=torch.bool)
    )
    out["ood"] = above | out["fallback"] | out["out_of_range"]
    return out


INPUT_RANGE_FACTOR = 4.0
"""An input whose norm exceeds this multiple of the largest training-input norm is out of range (always flagged)."""


def out_of_range(post, x: Tensor) -> Tensor:
    """Inputs far outside the training range: ``‖x‖ > INPUT_RANGE_FACTOR · max ‖x_train‖``.

    The largest training-input norm is recorded by :func:`~curvature.laplace.fit_laplace` as the metadata key
    ``input_norm_max``; without it nothing is out of range. Scores of networks with ReLUs are nearly scale
    invariant (``f(s x) ≈ s f(x)`` makes a scaled digit look more confident, not less), so this guard is what
    flags a digit multiplied by 1e3 or 1e30.
    """
    limit = post.metadata.get("input_norm_max")
    if limit is None:
        return torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    norms = x.reshape(x.shape[0], -1).double().norm(dim=-1)
    return ~(norms <= INPUT_RANGE_FACTOR * float(limit))

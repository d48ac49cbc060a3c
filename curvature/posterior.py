"""Laplace posterior over the weights of a trained network (thesis ch. 5).

Per layer the precision is ``P_l = n_eff · C_l + τ_l I`` where ``C_l`` is the layer's curvature per data point:
``G ⊗ A`` for the Kronecker approximations or a diagonal. Every layer is stored in a common eigenbasis form
``P_l = (U_G ⊗ U_A) diag(vec Λ_l) (U_G ⊗ U_A)ᵀ`` with an (out, in+1) eigenvalue matrix ``Λ_l``:

* exact damping: ``Λ = n s_G s_Aᵀ + τ`` (docs/design.md §3);
* factored damping, eq. 5.14: ``P ≈ (√n G + ω√τ I) ⊗ (√n A + ω⁻¹√τ I)``, same eigenvectors,
  ``Λ = (√n s_G + ω√τ)(√n s_A + √τ/ω)ᵀ``;
* diagonal (eq. 5.11): ``U_G = U_A = I`` and ``Λ = n D + τ``.

Samples are ``Ŵ* + U_G (Z ⊘ √Λ) U_Aᵀ``; the linearised predictive works in the same basis.
"""

from __future__ import annotations

import hashlib
import json
import math
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor, nn

from .estimators import DiagonalFactors, KroneckerFactors
from .kron import KronEigen, trace_norm_omega
from .layers import Layer, find_layers
from .likelihoods import Gaussian, Likelihood, likelihood_from_name

FORMAT_VERSION = 1
DAMPING_MODES = ("exact", "factored")

#: Values per independently seeded block of a large CPU draw of normals (:func:`standard_normals`). Fixed, so a
#: draw does not depend on how many threads fill it.
NORMAL_BLOCK = 1 << 22
_GOLDEN = 0x9E3779B97F4A7C15


def standard_normals(
    shape: tuple[int, ...], *, dtype: torch.dtype, device: torch.device, generator: torch.Generator | None = None
) -> Tensor:
    """Independent ``N(0, 1)`` values of ``shape``, reproducible from ``generator``.

    torch fills a CPU tensor with normals on one thread (the generator is shared state), which makes the normals
    of a large weight draw cost as much as the draw's matrix products. On CPU, draws of two blocks
    (:data:`NORMAL_BLOCK` values) or more are split into fixed blocks, each filled from its own generator seeded
    from one number drawn from ``generator``, on up to ``torch.get_num_threads()`` threads: the values depend on
    the seed and the shape only. Smaller draws and other devices use ``torch.randn``.
    """
    n = math.prod(shape)
    if torch.device(device).type != "cpu" or n < 2 * NORMAL_BLOCK:
        return torch.randn(*shape, dtype=dtype, device=device, generator=generator)
    base = int(torch.randint(0, 2**62, (1,), generator=generator))
    out = torch.empty(n, dtype=dtype)
    starts = range(0, n, NORMAL_BLOCK)

    def fill(index: int) -> None:
        block = torch.Generator().manual_seed((base + (index + 1) * _GOLDEN) % 2**63)
        out[starts[index] : starts[index] + NORMAL_BLOCK].normal_(generator=block)

    workers = max(1, min(torch.get_num_threads(), len(starts)))
    if workers == 1:
        for index in range(len(starts)):
            fill(index)
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(fill, range(len(starts))))
    return out.view(shape)


class LayerPosterior:
    """One layer's posterior in eigenbasis form (see module docstring): :class:`KronBlock` or :class:`DiagBlock`.

    Attributes:
        name: the layer's name in the model.
        mean: ``Ŵ*``, (out, in+1).
        kind: ``"kron"`` or ``"diag"``.
    """

    kind: str = ""
    name: str
    mean: Tensor
    omega: float = 1.0
    # Kronecker pieces (None for a diagonal block) and the diagonal curvature (None for a Kronecker block).
    U_G: Tensor | None = None
    U_A: Tensor | None = None
    s_G: Tensor | None = None
    s_A: Tensor | None = None
    diag: Tensor | None = None

    def _column_curvature(self) -> Tensor:
        raise NotImplementedError

    @property
    def null_columns(self) -> Tensor:
        """Input directions (columns of ``Λ``) the training data never excited: the curvature is ~0 there.

        Kronecker: eigenvectors of ``A`` with eigenvalue ≤ 1e-6 of the largest (e.g. pixels that are never lit,
        hidden units that never fire); diagonal: inputs whose curvature column is ≤ 1e-6 of the largest entry.
        """
        col = self._column_curvature()
        return col <= 1e-6 * col.max().clamp_min(torch.finfo(col.dtype).tiny)

    def prior_matrix(self, prior_precision: float, null_prior: float | None = None) -> float | Tensor:
        """``τ`` for every eigen-direction: a scalar, or per column when unseen directions get ``null_prior``."""
        if null_prior is None:
            return prior_precision
        mask = self.null_columns
        tau = torch.full(mask.shape, float(prior_precision), dtype=self.mean.dtype, device=self.mean.device)
        return tau.masked_fill(mask, float(null_prior))

    def eigenvalues(self, n_eff: float, prior_precision: float | Tensor, damping: str) -> Tensor:
        """The (out, in+1) matrix ``Λ`` of precision eigenvalues."""
        raise NotImplementedError

    def to_eigenbasis(self, V: Tensor) -> Tensor:
        """``V`` (..., out, in+1) in the precision's eigenbasis."""
        raise NotImplementedError

    def from_eigenbasis(self, V: Tensor, out: Tensor | None = None) -> Tensor:
        """``V`` (..., out, in+1) back from the precision's eigenbasis, written to ``out`` when given."""
        raise NotImplementedError

    def rotate_inputs(self, a: Tensor) -> Tensor:
        """Rows ``â`` (..., in+1) expressed in the input-side eigenbasis: ``â U_A``."""
        return a

    def rotate_outputs(self, g: Tensor) -> Tensor:
        """Rows ``g`` (..., out) expressed in the output-side eigenbasis: ``g U_G``."""
        return g

    def tensors(self) -> dict[str, Tensor]:
        """What :meth:`LaplacePosterior.to_bytes` stores for the block (besides the mean)."""
        raise NotImplementedError


class KronBlock(LayerPosterior):
    """A layer with Kronecker curvature ``G ⊗ A``, held as a :class:`~curvature.kron.KronEigen`."""

    kind = "kron"

    def __init__(self, name: str, mean: Tensor, eigen: KronEigen, omega: float = 1.0) -> None:
        self.name, self.mean, self.eigen, self.omega = name, mean, eigen, float(omega)

    U_G = property(lambda self: self.eigen.U_G)  # type: ignore[assignment]
    U_A = property(lambda self: self.eigen.U_A)  # type: ignore[assignment]
    s_G = property(lambda self: self.eigen.s_G)  # type: ignore[assignment]
    s_A = property(lambda self: self.eigen.s_A)  # type: ignore[assignment]

    def _column_curvature(self) -> Tensor:
        return self.eigen.s_A

    def eigenvalues(self, n_eff: float, prior_precision: float | Tensor, damping: str) -> Tensor:
        if damping == "exact":
            return self.eigen.eigenvalues(n_eff, prior_precision)
        return self.eigen.factored(n_eff, prior_precision, self.omega).eigenvalues()

    def to_eigenbasis(self, V: Tensor) -> Tensor:
        return self.eigen.to_eigenbasis(V)

    def from_eigenbasis(self, V: Tensor, out: Tensor | None = None) -> Tensor:
        return self.eigen.from_eigenbasis(V, out=out)

    def rotate_inputs(self, a: Tensor) -> Tensor:
        return a @ self.eigen.U_A

    def rotate_outputs(self, g: Tensor) -> Tensor:
        return g @ self.eigen.U_G

    def tensors(self) -> dict[str, Tensor]:
        e = self.eigen
        return {"U_G": e.U_G, "U_A": e.U_A, "s_G": e.s_G, "s_A": e.s_A}


class DiagBlock(LayerPosterior):
    """A layer with diagonal curvature (thesis eq. 5.11): the eigenbasis is the identity, ``Λ = n D + τ``."""

    kind = "diag"

    def __init__(self, name: str, mean: Tensor, diag: Tensor) -> None:
        self.name, self.mean, self.diag, self.omega = name, mean, diag, 1.0

    def _column_curvature(self) -> Tensor:
        return self.diag.amax(0)

    def eigenvalues(self, n_eff: float, prior_precision: float | Tensor, damping: str) -> Tensor:
        return n_eff * self.diag + prior_precision

    def to_eigenbasis(self, V: Tensor) -> Tensor:
        return V

    def from_eigenbasis(self, V: Tensor, out: Tensor | None = None) -> Tensor:
        return V if out is None else out.copy_(V)

    def tensors(self) -> dict[str, Tensor]:
        return {"diag": self.diag}


class LaplacePosterior:
    """Gaussian posterior ``N(θ*, P⁻¹)`` with block-diagonal precision, one block per layer.

    Args:
        model: the trained network; its current weights are the posterior mean ``θ*``.
        factors: :class:`KroneckerFactors` (KFAC / KFLR / KFRA / rp) or :class:`DiagonalFactors`.
        likelihood: the likelihood the network was trained with.
        n_eff: effective data size ``N_eff`` (default: the number of points the factors were fitted on).
        prior_precision: ``τ``, a scalar or a mapping from layer name to scalar.
        damping: ``"exact"`` (eigen-damping) or ``"factored"`` (thesis eq. 5.14).
        omega: ``1.0`` (eq. 5.14) or ``"trace"`` for the trace-norm choice of eq. 4.27 (factored damping only).
        eigh_dtype: precision of the factors' eigendecompositions (``None``: the factors' own dtype).
    """

    def __init__(
        self,
        model: nn.Module,
        factors: KroneckerFactors | DiagonalFactors,
        likelihood: Likelihood,
        n_eff: float | None = None,
        prior_precision: float | dict[str, float] = 1.0,
        damping: str = "exact",
        omega: float | str = 1.0,
        eigh_dtype: torch.dtype | None = torch.float64,
    ) -> None:
        if damping not in DAMPING_MODES:
            raise ValueError(f"damping must be one of {DAMPING_MODES}, got {damping!r}.")
        self.model = model
        self.likelihood = likelihood
        self.damping = damping
        self.method = factors.method
        self.n_data = int(factors.n_data)
        self.layers: list[Layer] = find_layers(model, include=list(factors))
        self.blocks: dict[str, LayerPosterior] = {}
        for layer in self.layers:
            mean = layer.handler.weight_matrix(layer.module).detach().clone()
            if isinstance(factors, DiagonalFactors):
                block: LayerPosterior = DiagBlock(layer.name, mean, factors[layer.name].clone())
            else:
                f = factors[layer.name]
                w = trace_norm_omega(f.G, f.A) if omega == "trace" else float(omega)
                block = KronBlock(layer.name, mean, KronEigen.from_factors(f.G, f.A, eigh_dtype), w)
            self.blocks[layer.name] = block
        self.n_eff = float(self.n_data if n_eff is None else n_eff)
        self.prior_precision = prior_precision
        self._null_prior: dict[str, float] = {}
        self.ood_table: dict[str, dict[str, float]] = {}
        self.metadata: dict[str, object] = {}
        self._bank: dict[tuple[int, int], dict[str, Tensor]] = {}
        self._model_layers = _layer_signature(model)

    # ----------------------------------------------------------------------------------------------- basics
    @property
    def prior_precision(self) -> dict[str, float]:
        return self._prior

    @prior_precision.setter
    def prior_precision(self, value: float | dict[str, float]) -> None:
        if isinstance(value, dict):
            missing = set(self.blocks) - set(value)
            if missing:
                raise ValueError(f"prior_precision is missing layers {sorted(missing)}.")
            prior = {k: float(value[k]) for k in self.blocks}
        else:
            prior = dict.fromkeys(self.blocks, float(value))
        if any(not (v > 0 and math.isfinite(v)) for v in prior.values()):
            raise ValueError("prior precision must be positive and finite.")
        self._prior = prior
        self._bank = {}

    @property
    def null_prior(self) -> dict[str, float]:
        """Prior precision of the directions the data never excited, per layer (empty: the layer's ``τ``)."""
        return dict(self._null_prior)

    @null_prior.setter
    def null_prior(self, value: float | dict[str, float] | None) -> None:
        if value is None:
            value = {}
        elif not isinstance(value, dict):
            value = {name: float(value) for name, block in self.blocks.items() if bool(block.null_columns.any())}
        if any(not (v > 0 and math.isfinite(v)) for v in value.values()):
            raise ValueError("null prior precision must be positive and finite.")
        if value and self.damping == "factored":
            raise ValueError("A separate prior for unseen directions needs exact damping.")
        unknown = set(value) - set(self.blocks)
        if unknown:
            raise ValueError(f"Unknown layers {sorted(unknown)}.")
        self._null_prior = {k: float(v) for k, v in value.items()}
        self._bank = {}

    def prior_matrix(self, name: str, prior: float | None = None, null_prior: float | None = None):
        """``τ`` of a layer per eigen-direction (a scalar unless a null-space prior is set)."""
        tau = self._prior[name] if prior is None else prior
        tau0 = self._null_prior.get(name) if null_prior is None else null_prior
        return self.blocks[name].prior_matrix(tau, tau0)

    def set_hyperparameters(self, n_eff: float | None = None, prior_precision=None) -> None:
        """Change ``N_eff`` and/or ``τ`` (no refit needed)."""
        if n_eff is not None:
            if not (n_eff > 0 and math.isfinite(n_eff)):
                raise ValueError(f"n_eff must be positive, got {n_eff}.")
            self.n_eff = float(n_eff)
            self._bank = {}
        if prior_precision is not None:
            self.prior_precision = prior_precision

    @property
    def n_params(self) -> int:
        return sum(b.mean.numel() for b in self.blocks.values())

    def eigenvalues(self, name: str, n_eff: float | None = None, prior: float | Tensor | None = None) -> Tensor:
        """Precision eigenvalues of a layer; ``prior`` overrides the stored ``τ`` (and null-space prior)."""
        n = self.n_eff if n_eff is None else n_eff
        tau = self.prior_matrix(name) if prior is None else prior
        return self.blocks[name].eigenvalues(n, tau, self.damping)

    # ---------------------------------------------------------------------------------------- the Gaussian
    def sample(self, k: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """``k`` weight samples per layer, (k, out, in+1), in antithetic pairs.

        ``h = ⌈k/2⌉`` offsets ``δ_i ~ N(0, P⁻¹)`` are drawn; sample ``i < h`` is ``θ* + δ_i`` and sample ``h + i``
        is ``θ* − δ_i``. Each sample is still a draw from the posterior, and a pair's offsets cancel: an MC
        average's error from the part of the network that is linear in the weights is zero, so its argmax does
        not flip on Monte-Carlo noise alone, and only ``h`` offsets are rotated out of the eigenbasis (half the
        normals and matrix products).
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}.")
        half = (k + 1) // 2
        out = {}
        for name, block in self.blocks.items():
            lam = self.eigenvalues(name)
            z = standard_normals((half, *lam.shape), dtype=lam.dtype, device=lam.device, generator=generator)
            # in place and into the result: the draws of a large layer are large
            w = torch.empty(k, *lam.shape, dtype=lam.dtype, device=lam.device)
            block.from_eigenbasis(z.mul_(lam.rsqrt()), out=w[:half])
            del z
            torch.sub(block.mean, w[: k - half], out=w[half:])
            w[:half].add_(block.mean)
            out[name] = w
        return out

    @staticmethod
    def paired_indices(k: int, pairs: int) -> Tensor:
        """Indices, in a set of ``k`` samples from :meth:`sample`, of the first ``pairs`` offsets followed by their
        antithetic partners."""
        return torch.cat([torch.arange(pairs), (k + 1) // 2 + torch.arange(pairs)])

    def cached_samples(self, k: int, seed: int, max_bytes: int) -> dict[str, Tensor]:
        """The ``k`` weight samples drawn with ``seed``, kept (the most recent set only) when under ``max_bytes``.

        Changing a hyper-parameter drops the kept set.
        """
        key = (k, seed)
        if key in self._bank:
            return self._bank[key]
        gen = torch.Generator(device=next(iter(self.blocks.values())).mean.device).manual_seed(seed)
        draws = self.sample(k, generator=gen)
        if k * self.n_params * draws[next(iter(draws))].element_size() <= max_bytes:
            self._bank = {key: draws}
        return draws

    @property
    def kept_samples(self) -> dict[tuple[int, int], dict[str, Tensor]]:
        """The weight-sample sets kept for reuse, keyed by ``(k, seed)`` (a copy of the mapping)."""
        return dict(self._bank)

    def offer_samples(self, sets: dict[tuple[int, int], dict[str, Tensor]]) -> None:
        """Hand back sets drawn earlier by :meth:`cached_samples` (e.g. a server keeping several ``(k, seed)``).

        They must come from this posterior at its current hyper-parameters; they are dropped when those change.
        """
        self._bank = {**sets, **self._bank}

    def log_prob(self, weights: dict[str, Tensor]) -> Tensor:
        """``log N(θ; θ*, P⁻¹)`` for weights given per layer as (..., out, in+1)."""
        total = 0.0
        for name, block in self.blocks.items():
            lam = self.eigenvalues(name)
            d = block.to_eigenbasis(weights[name] - block.mean)
            total = total + 0.5 * (lam.log().sum() - (lam * d**2).sum((-1, -2)) - lam.numel() * math.log(2 * math.pi))
        return total

    def logdet_precision(self, n_eff: float | None = None, prior: dict[str, float] | None = None) -> Tensor:
        return sum(
            self.eigenvalues(name, n_eff, None if prior is None else prior[name]).log().sum() for name in self.blocks
        )

    def log_marginal_likelihood(
        self, train_nll: float, n_eff: float | None = None, prior: float | dict[str, float] | None = None
    ) -> float:
        """Laplace evidence ``log p(D) ≈ −(n/N)·nll(θ*) − ½ Σ τ_l ‖θ*_l‖² + ½ Σ P_l log τ_l − ½ log det P``.

        ``train_nll`` is the summed negative log-likelihood of the ``N`` training points at ``θ*``; with
        ``n_eff ≠ N`` the likelihood is tempered by ``n_eff / N``.
        """
        n = self.n_eff if n_eff is None else float(n_eff)
        if prior is not None and not isinstance(prior, dict):
            prior = dict.fromkeys(self.blocks, float(prior))
        value = -(n / self.n_data) * train_nll
        for name, block in self.blocks.items():
            tau = self.prior_matrix(name) if prior is None else prior[name]
            if isinstance(tau, Tensor):  # per-direction prior: work in the eigenbasis
                theta2 = block.to_eigenbasis(block.mean) ** 2
                full = tau.expand_as(theta2)
                value += -0.5 * float((full * theta2).sum()) + 0.5 * float(full.log().sum())
            else:
                value += -0.5 * tau * float((block.mean**2).sum()) + 0.5 * block.mean.numel() * math.log(tau)
            value -= 0.5 * float(self.eigenvalues(name, n, tau).log().sum())
        return value

    # ------------------------------------------------------------------------------------------ predicting
    def predict(
        self,
        x: Tensor,
        samples: int = 100,
        predictive: str | None = None,
        ood_score: str | None = None,
        seed: int | None = None,
        link: str | None = None,
        batch_size: int = 1024,
    ) -> dict[str, Tensor]:
        """Predictive distribution for inputs ``x``; see :func:`curvature.predictive.predict`."""
        from .predictive import predict

        return predict(
            self,
            x,
            samples=samples,
            predictive=predictive,
            ood_score=ood_score,
            seed=seed,
            link=link,
            batch_size=batch_size,
        )

    @property
    def default_predictive(self) -> str:
        """The predictive the fit was configured (and tuned) for; ``predict`` uses it unless told otherwise."""
        return str(self.metadata.get("predictive", "mc"))

    @property
    def ood_thresholds(self) -> dict[str, float]:
        """Thresholds per OOD score for the default predictive (``ood_table`` holds every predictive)."""
        return self.ood_table.setdefault(self.default_predictive, {})

    def ood_threshold(self, score: str, predictive: str | None = None) -> float:
        """The calibrated threshold of an OOD score for a predictive (see :mod:`curvature.ood`)."""
        table = self.ood_table.get(predictive or self.default_predictive, {})
        if score not in table:
            raise ValueError(f"No OOD threshold calibrated for score {score!r}; have {sorted(table)}.")
        return table[score]

    def summary(self) -> dict[str, object]:
        """JSON-able description of the posterior."""
        taus = sorted(set(self._prior.values()))
        return {
            "method": self.method,
            "damping": self.damping,
            "likelihood": self.likelihood.name,
            "n_data": self.n_data,
            "n_eff": self.n_eff,
            "prior_precision": taus[0] if len(taus) == 1 else dict(self._prior),
            "null_prior": dict(self._null_prior),
            "n_params": self.n_params,
            "layers": {n: list(b.mean.shape) for n, b in self.blocks.items()},
            "ood_thresholds": dict(self.ood_thresholds),
            **self.metadata,
        }

    # ------------------------------------------------------------------------------------- serialisation
    def to_bytes(self) -> bytes:
        """safetensors bytes with a JSON header; no pickle anywhere."""
        from safetensors.torch import save

        tensors: dict[str, Tensor] = {}
        layers = []
        for name, b in self.blocks.items():
            key = f"l{len(layers)}"
            entry = {"name": name, "key": key, "kind": b.kind, "omega": b.omega}
            tensors[f"{key}.mean"] = b.mean
            tensors.update({f"{key}.{part}": t for part, t in b.tensors().items()})
            layers.append(entry)
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        meta = {
            "format": "kronlap-laplace",
            "version": FORMAT_VERSION,
            "method": self.method,
            "damping": self.damping,
            "likelihood": self.likelihood.name,
            "sigma": getattr(self.likelihood, "sigma", None),
            "n_data": self.n_data,
            "n_eff": self.n_eff,
            "prior_precision": self._prior,
            "null_prior": self._null_prior,
            "ood_table": self.ood_table,
            "metadata": self.metadata,
            "layers": layers,
            "model_layers": self._model_layers,
        }
        meta["digest"] = _digest(tensors, meta)
        return save(tensors, metadata={"kronlap": json.dumps(meta)})

    @classmethod
    def from_bytes(cls, blob: bytes, model: nn.Module) -> LaplacePosterior:
        """Load a posterior saved by :meth:`to_bytes` onto ``model`` (whose weights must equal the saved mean).

        Raises:
            ValueError: not a kronlap posterior, tampered contents, or a model that does not match.
        """
        from safetensors import safe_open  # noqa: F401  (import check: the format is safetensors)
        from safetensors.torch import load

        try:
            tensors = load(bytes(blob))
            header_len = int.from_bytes(bytes(blob[:8]), "little")
            header = json.loads(bytes(blob[8 : 8 + header_len]))
            meta = json.loads(header["__metadata__"]["kronlap"])
        except Exception as exc:  # noqa: BLE001 - any decoding failure means "not ours"
            raise ValueError(f"Not a kronlap posterior file: {exc}") from None
        if meta.get("format") != "kronlap-laplace" or meta.get("version") != FORMAT_VERSION:
            raise ValueError("Not a kronlap posterior file (format/version mismatch).")
        if _digest(tensors, {k: v for k, v in meta.items() if k != "digest"}) != meta.get("digest"):
            raise ValueError("Posterior file contents do not match their digest (tampered or corrupted).")
        self = cls.__new__(cls)
        self.model = model
        sigma = meta.get("sigma")
        name = meta["likelihood"]
        self.likelihood = (
            likelihood_from_name(name, sigma=sigma) if name == "regression" else likelihood_from_name(name)
        )
        self.damping = meta["damping"]
        self.method = meta["method"]
        self.n_data = int(meta["n_data"])
        self.n_eff = float(meta["n_eff"])
        names = [entry["name"] for entry in meta["layers"]]
        try:
            self.layers = find_layers(model, include=names)
            signature = _layer_signature(model)
        except ValueError as exc:
            raise ValueError(f"The model does not match the posterior: {exc}") from None
        if signature != meta.get("model_layers"):
            raise ValueError("The model's trainable layers do not match those the posterior was fitted on.")
        self._model_layers = signature
        device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
        self.blocks = {}
        for layer, entry in zip(self.layers, meta["layers"], strict=True):
            key = entry["key"]

            def get(suffix, key=key):
                t = tensors.get(f"{key}.{suffix}")
                return None if t is None else t.to(device=device, dtype=dtype)

            mean = get("mean")
            current = layer.handler.weight_matrix(layer.module).detach()
            if mean.shape != current.shape or not torch.equal(mean, current):
                raise ValueError(f"Layer {layer.name!r} of the model does not match the posterior mean.")
            if entry["kind"] == "diag":
                self.blocks[layer.name] = DiagBlock(layer.name, mean, get("diag"))
            else:
                eigen = KronEigen(get("s_G"), get("U_G"), get("s_A"), get("U_A"))
                self.blocks[layer.name] = KronBlock(layer.name, mean, eigen, float(entry["omega"]))
        self._prior = {k: float(v) for k, v in meta["prior_precision"].items()}
        self._null_prior = {k: float(v) for k, v in meta.get("null_prior", {}).items()}
        self.ood_table = {p: {k: float(v) for k, v in t.items()} for p, t in meta["ood_table"].items()}
        self.metadata = dict(meta.get("metadata") or {})
        self._bank = {}
        return self


def _layer_signature(model: nn.Module) -> list[list]:
    """Names and ``Ŵ`` shapes of every trainable layer of a model."""
    return [[layer.name, list(layer.shape)] for layer in find_layers(model)]


def _digest(tensors: dict[str, Tensor], meta: dict) -> str:
    h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for key in sorted(tensors):
        t = tensors[key]
        h.update(key.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def estimate_sigma(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1024) -> float:
    """Maximum-likelihood noise scale of a regression network: ``√(mean residual²)``."""
    sq, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            f = model(x[i : i + batch_size])
            r = y[i : i + batch_size].reshape(f.shape) - f
            sq += float((r**2).sum())
            count += r.numel()
    return max(math.sqrt(sq / max(count, 1)), 1e-6)


__all__ = [
    "DAMPING_MODES",
    "DiagBlock",
    "Gaussian",
    "KronBlock",
    "LaplacePosterior",
    "LayerPosterior",
    "estimate_sigma",
]

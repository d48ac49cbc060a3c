"""Second-order optimiser with Kronecker-factored Gauss-Newton curvature (thesis §4.4, eqs 4.16-4.27).

The objective is ``E(θ) = (1/n) Σ_n −log p(y_n|x_n, θ) + (λ/2)‖θ‖²`` on each minibatch, with ``θ`` the layers'
``Ŵ = [W b]`` (docs/design.md §3). One step:

1. gradient ``∇E`` and the curvature ``G̃`` of one estimator (KFRA, KFLR, KFAC, random projections: per layer
   ``G ⊗ A``; or the diagonal GGN), refreshed every ``curvature_interval`` steps, optionally as an exponential
   moving average;
2. direction ``δ̃ = −(G̃ + (λ+ζ)I)⁻¹ ∇E`` block by block (eq. 4.16, 4.23), with factored damping
   ``(G + ω√(λ+ζ) I)⁻¹ ⊗ (A + ω⁻¹√(λ+ζ) I)⁻¹`` and the trace-norm ``ω`` (eq. 4.25-4.27), or exact eigen-damping;
3. step size from the quadratic model ``q(αδ̃) = E + α δ̃ᵀ∇E + (α²/2) δ̃ᵀ C δ̃`` with ``C = Ḡ + (λ+τ)I`` and the
   full-network Gauss-Newton ``Ḡ`` (eq. 4.17-4.20): ``α* = −δ̃ᵀ∇E / δ̃ᵀCδ̃``. ``δ̃ᵀḠδ̃ = (1/n) Σ_n (J_n δ̃)ᵀ Λ_n (J_n δ̃)``
   needs one forward-mode product ``J δ̃``. With momentum, ``(α, μ)`` minimise ``q(αδ̃ + μ v)`` along ``δ̃`` and the
   previous update ``v`` (a 2×2 solve);
4. every ``tau_interval`` steps the reduction ratio ``ρ = (E(θ+Δ) − E(θ)) / (q(Δ) − q(0))`` on the same batch
   adapts the Levenberg-Marquardt ``τ`` (eq. 4.21): ``τ ← ω_τ τ`` when ``ρ > 0.75``, ``τ ← τ/ω_τ`` when
   ``ρ < 0.75``; every ``zeta_interval`` steps ``ζ`` is chosen greedily from ``{ω_ζ ζ, ζ, ζ/ω_ζ}`` as the value
   whose step minimises the quadratic model (eq. 4.22-4.23).

A step whose loss, direction, step size or new loss is not finite is never applied: the parameters stay (or are
restored to) the last finite point, and ``τ`` and ``ζ`` are multiplied by ``rejection_factor``.

Example::

    opt = cv.SecondOrderOptimizer(model, cv.Bernoulli(), cv.OptimizerConfig(curvature="kfra"))
    for x, y in loader:
        info = opt.step(x, y)          # info.loss, info.alpha, info.tau, info.zeta, info.rho, ...
    torch.save(opt.state_dict(), "opt.pt")
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp, vmap

from .estimators import fit_diagonal, fit_kronecker
from .kron import KronEigen, factored_damping, trace_norm_omega
from .layers import Layer, find_layers
from .likelihoods import Likelihood
from .options import Curvature, Damping

Matrices = dict[str, Tensor]


@dataclass
class OptimizerConfig:
    """Settings of :class:`SecondOrderOptimizer`.

    The damping rules are the thesis's (§4.4). Three defaults are not: momentum is on (the 2×2 quadratic-model
    solve of Martens & Grosse, which kfac-jax also uses; the thesis found plain momentum on the update unstable,
    but here μ is chosen by the model, never fixed), and the curvature and its inverses are refreshed every second
    step with a moving average of weight 0.5, which costs less per second than refreshing every step at nearly the
    same progress per step. The initial ``τ = ζ = 0.1`` suit losses averaged over the batch.

    Attributes:
        curvature: ``kfra``, ``kflr``, ``kfac`` (``mc_samples`` sampled targets), ``rp`` or ``diag`` (the
            diagonal GGN).
        damping: ``factored`` (eq. 4.25 with the trace-norm ω of eq. 4.27) or ``exact`` eigen-damping.
        weight_decay: ``λ`` of the objective.
        tau, zeta: initial Levenberg-Marquardt damping ``τ`` (quadratic model) and curvature damping ``ζ``.
        tau_interval, tau_decay: ``T_τ`` and ``ω_τ`` of the reduction-ratio rule.
        rho_low, rho_high: ``τ`` grows when ``ρ < rho_low`` and shrinks when ``ρ > rho_high`` (both 0.75 in
            the thesis; Martens & Grosse use 0.25 / 0.75).
        zeta_interval, zeta_decay: ``T_ζ`` and ``ω_ζ`` of the greedy ``ζ`` search.
        momentum: solve for ``(α, μ)`` along the direction and the previous update.
        curvature_interval: recompute the curvature every this many steps (1: every step).
        inverse_interval: rebuild the damped inverses from the current factors every this many steps (they are
            also rebuilt when ``ζ`` changes, since they depend on it).
        curvature_ema: ``β`` of the moving average ``F ← β F + (1−β) F_batch`` of the factors (0: none).
        curvature_batch: examples of each batch used for the curvature (``None``: the whole batch).
        curvature_vectors: for ``kflr`` and ``diag``, whose cost per example grows with the number of outputs
            ``C`` (one vector per output dimension pulled back through the network, or on Linear chains a
            per-example square root of ``C`` columns), the curvature batch is also capped at
            ``curvature_vectors // C`` examples, so that a wide output layer does not make every refresh cost
            hundreds of backward passes. ``None``: no cap.
        mc_samples: sampled targets per example for ``kfac`` and ``rp``.
        seed: seed of the sampling generator (saved in :meth:`SecondOrderOptimizer.state_dict`).
        rejection_factor: damping multiplier after a rejected (non-finite) step.
        min_damping, max_damping: bounds of ``τ`` and ``ζ``.
    """

    curvature: Curvature = Curvature.kfra
    damping: Damping = Damping.factored
    weight_decay: float = 0.0
    tau: float = 0.1
    zeta: float = 0.1
    tau_interval: int = 5
    tau_decay: float = 0.95
    rho_low: float = 0.75
    rho_high: float = 0.75
    zeta_interval: int = 20
    zeta_decay: float = 0.95
    momentum: bool = True
    curvature_interval: int = 2
    inverse_interval: int = 2
    curvature_ema: float = 0.5
    curvature_batch: int | None = None
    curvature_vectors: int | None = 8192
    mc_samples: int = 1
    seed: int = 0
    rejection_factor: float = 10.0
    min_damping: float = 1e-8
    max_damping: float = 1e8

    def __post_init__(self) -> None:
        try:
            self.curvature = Curvature(self.curvature)
        except ValueError:
            raise ValueError(
                f"Unknown curvature {self.curvature!r}; choose from {[c.value for c in Curvature]}."
            ) from None
        try:
            self.damping = Damping(self.damping)
        except ValueError:
            raise ValueError(f"Unknown damping {self.damping!r}; choose from {[d.value for d in Damping]}.") from None
        if self.curvature == Curvature.diag and self.damping == Damping.factored:
            self.damping = Damping.exact  # a diagonal plus (λ+ζ)I is inverted exactly; nothing to factor
        for name in ("tau_interval", "zeta_interval", "curvature_interval", "inverse_interval", "mc_samples"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}.")
        for name in ("tau_decay", "zeta_decay"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}.")
        if not 0 <= self.curvature_ema < 1:
            raise ValueError(f"curvature_ema must be in [0, 1), got {self.curvature_ema}.")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be non-negative, got {self.weight_decay}.")
        if not 0 < self.min_damping <= self.max_damping:
            raise ValueError("Need 0 < min_damping <= max_damping.")
        for name in ("tau", "zeta"):
            if not self.min_damping <= getattr(self, name) <= self.max_damping:
                raise ValueError(f"{name} must lie in [min_damping, max_damping], got {getattr(self, name)}.")
        if self.rho_low > self.rho_high:
            raise ValueError("rho_low must not exceed rho_high.")
        if self.rejection_factor < 1:
            raise ValueError(f"rejection_factor must be >= 1, got {self.rejection_factor}.")
        for name in ("curvature_batch", "curvature_vectors"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be positive or None, got {value}.")


@dataclass(frozen=True)
class StepInfo:
    """Diagnostics of one :meth:`SecondOrderOptimizer.step`.

    Attributes:
        step: index of the step (0-based).
        loss: ``E(θ)`` on the batch before the update (mean negative log-likelihood plus weight decay).
        alpha, mu: step size along the direction and along the previous update (``mu = 0`` without momentum).
        tau, zeta: damping after this step's adaptation.
        rho: reduction ratio (eq. 4.21), ``nan`` on steps that do not evaluate it.
        model_change: ``q(Δ) − q(0)``, the change the quadratic model predicts.
        accepted: ``False`` when the step was rejected as non-finite (nothing applied, damping raised).
    """

    step: int
    loss: float
    alpha: float
    mu: float
    tau: float
    zeta: float
    rho: float
    model_change: float
    accepted: bool

    def as_dict(self) -> dict[str, float | int | bool]:
        return asdict(self)


@dataclass
class _Candidate:
    delta: Matrices
    alpha: float
    mu: float
    model_change: float


def _finite(x: float) -> bool:
    return math.isfinite(x)


def _dot(a: Matrices, b: Matrices) -> float:
    return float(sum((a[k] * b[k]).sum() for k in a))


def _cholesky(m: Tensor) -> Tensor:
    """Lower Cholesky factor of a symmetric positive-definite matrix, factorised in float64, cast back.

    Applying ``m⁻¹`` with two triangular solves costs what one matrix product does and is backward stable in the
    model's precision; forming the explicit inverse would cost three times the factorisation.
    """
    m64 = m.to(torch.float64)
    return torch.linalg.cholesky(0.5 * (m64 + m64.T)).to(m.dtype)


class SecondOrderOptimizer:
    """Kronecker-factored (or diagonal) Gauss-Newton optimiser of thesis §4.4.

    Args:
        model: the network; its output is the likelihood's input. Every trainable parameter must belong to a
            Linear or Conv2d layer (``kfra``: a chain of Linear layers).
        likelihood: e.g. :class:`~curvature.Bernoulli` for an autoencoder on logits.
        config: :class:`OptimizerConfig` (defaults if omitted).
    """

    def __init__(self, model: nn.Module, likelihood: Likelihood, config: OptimizerConfig | None = None) -> None:
        self.model = model
        self.likelihood = likelihood
        self.config = OptimizerConfig() if config is None else config
        self.layers: list[Layer] = find_layers(model)
        self._param_names: dict[str, tuple[str, str | None]] = {}
        named = dict(model.named_parameters())
        for layer in self.layers:
            prefix = f"{layer.name}." if layer.name else ""
            bias = prefix + "bias" if layer.module.bias is not None else None
            self._param_names[layer.name] = (prefix + "weight", bias)
        self._params = {n: named[n] for pair in self._param_names.values() for n in pair if n is not None}
        device = next(model.parameters()).device
        self.generator = torch.Generator(device=device).manual_seed(self.config.seed)
        self.steps = 0
        self.tau = float(self.config.tau)
        self.zeta = float(self.config.zeta)
        self.factors: dict[str, dict[str, Tensor]] = {}  # per layer {"A", "G"} or {"diag"}
        self._inverse: dict[str, dict[str, Tensor]] = {}  # per layer: inverse factors / eigenbasis
        self._inverse_zeta: float | None = None
        self._eigen: dict[str, dict[str, Tensor]] = {}
        self._previous_update: Matrices | None = None
        self._previous_params: Matrices | None = None

    # ------------------------------------------------------------------ parameters as Ŵ matrices

    def _matrices(self, tensors: dict[str, Tensor]) -> Matrices:
        out = {}
        for layer in self.layers:
            w_name, b_name = self._param_names[layer.name]
            w = tensors[w_name].reshape(tensors[w_name].shape[0], -1)
            out[layer.name] = w if b_name is None else torch.cat([w, tensors[b_name].unsqueeze(1)], dim=1)
        return out

    def _split(self, matrices: Matrices) -> dict[str, Tensor]:
        out = {}
        for layer in self.layers:
            w_name, b_name = self._param_names[layer.name]
            w, b = layer.handler.split_matrix(layer.module, matrices[layer.name])
            out[w_name] = w
            if b_name is not None:
                out[b_name] = b
        return out

    def _add_to_params(self, update: Matrices) -> None:
        with torch.no_grad():
            for name, t in self._split(update).items():
                self._params[name].add_(t)

    def _set_params(self, matrices: Matrices) -> None:
        with torch.no_grad():
            for name, t in self._split(matrices).items():
                self._params[name].copy_(t)

    # ------------------------------------------------------------------ objective

    def _outputs(self, x: Tensor) -> Tensor:
        f = self.model(x)
        return f.unsqueeze(-1) if f.dim() == 1 else f

    def _weight_penalty(self) -> Tensor | float:
        lam = self.config.weight_decay
        if lam == 0:
            return 0.0
        return 0.5 * lam * sum((p * p).sum() for p in self._params.values())

    def _loss_and_grad(self, x: Tensor, y: Tensor) -> tuple[float, Matrices]:
        with torch.enable_grad():
            f = self._outputs(x)
            loss = self.likelihood.nll(f, y) / x.shape[0] + self._weight_penalty()
            names = list(self._params)
            grads = torch.autograd.grad(loss, [self._params[n] for n in names])
        return float(loss.detach()), self._matrices(dict(zip(names, grads, strict=True)))

    @torch.no_grad()
    def loss(self, x: Tensor, y: Tensor) -> float:
        """``E(θ)`` on a batch: mean negative log-likelihood plus ``(λ/2)‖θ‖²``."""
        f = self._outputs(x)
        return float(self.likelihood.nll(f, y) / x.shape[0] + self._weight_penalty())

    # ------------------------------------------------------------------ curvature

    def _curvature_rows(self, x: Tensor, y: Tensor) -> int:
        cfg = self.config
        n = x.shape[0]
        if cfg.curvature_batch is not None:
            n = min(n, cfg.curvature_batch)
        if cfg.curvature_vectors is not None and cfg.curvature in (Curvature.kflr, Curvature.diag):
            with torch.no_grad():
                n_out = self._outputs(x[:1]).shape[-1]
            n = min(n, max(1, cfg.curvature_vectors // n_out))
        return n

    def _refresh_curvature(self, x: Tensor, y: Tensor) -> None:
        cfg = self.config
        m = self._curvature_rows(x, y)
        data = (x[:m], y[:m])
        if cfg.curvature == Curvature.diag:
            diag = fit_diagonal(self.model, data, self.likelihood, method="ggn", batch_size=m)
            new = {name: {"diag": d} for name, d in diag.items()}
        else:
            fitted = fit_kronecker(
                self.model,
                data,
                self.likelihood,
                method=cfg.curvature.value,
                mc_samples=cfg.mc_samples,
                batch_size=m,
                generator=self.generator,
                include=[layer.name for layer in self.layers],
            )
            new = {name: {"A": lf.A, "G": lf.G} for name, lf in fitted.items()}
        beta = cfg.curvature_ema
        if beta > 0 and self.factors:
            for name, parts in new.items():
                for key, value in parts.items():
                    self.factors[name][key].mul_(beta).add_(value, alpha=1 - beta)
        else:
            self.factors = new

    def _build_inverse(self, zeta: float) -> dict[str, dict[str, Tensor]]:
        """What applying ``(G̃ + (λ+ζ)I)⁻¹`` needs, per layer, for the configured damping."""
        cfg = self.config
        shift = cfg.weight_decay + zeta
        out: dict[str, dict[str, Tensor]] = {}
        for name, parts in self.factors.items():
            if cfg.curvature == Curvature.diag:
                out[name] = {"denominator": parts["diag"] + shift}
            elif cfg.damping == Damping.exact:
                out[name] = self._eigen[name]  # ζ enters only when the eigenvalues are shifted
            else:
                omega = trace_norm_omega(parts["G"], parts["A"])
                pg, pa = factored_damping(parts["G"], parts["A"], 1.0, shift, omega)
                out[name] = {"G_chol": _cholesky(pg), "A_chol": _cholesky(pa)}
        return out

    def _eigen_ok(self) -> bool:
        return self.config.damping != Damping.exact or self.config.curvature == Curvature.diag or bool(self._eigen)

    def _rebuild_basis(self) -> None:
        """Invalidate the damped inverses; for exact damping, eigendecompose the current factors."""
        self._inverse, self._inverse_zeta = {}, None
        if self.config.damping == Damping.exact and self.config.curvature != Curvature.diag:
            self._eigen = {}
            for name, parts in self.factors.items():
                eig = KronEigen.from_factors(parts["G"], parts["A"])
                self._eigen[name] = {"s_G": eig.s_G, "U_G": eig.U_G, "s_A": eig.s_A, "U_A": eig.U_A}

    def _direction(self, inverse: dict[str, dict[str, Tensor]], grad: Matrices, zeta: float) -> Matrices:
        """``δ̃ = −(G̃ + (λ+ζ)I)⁻¹ ∇E`` block by block (eq. 4.16, 4.23)."""
        cfg = self.config
        out = {}
        for name, g in grad.items():
            inv = inverse[name]
            if "denominator" in inv:
                out[name] = -g / inv["denominator"]
            elif "G_chol" in inv:
                # P_G⁻¹ g P_A⁻¹ = (P_A⁻¹ (P_G⁻¹ g)ᵀ)ᵀ, both factors symmetric
                left = torch.cholesky_solve(g, inv["G_chol"])
                out[name] = -torch.cholesky_solve(left.T, inv["A_chol"]).T
            else:
                eig = KronEigen(inv["s_G"], inv["U_G"], inv["s_A"], inv["U_A"])
                out[name] = -eig.damped_inverse_apply(g, 1.0, cfg.weight_decay + zeta)
        return out

    # ------------------------------------------------------------------ quadratic model

    def _jvps(self, x: Tensor, tangents: list[Matrices]) -> tuple[Tensor, list[Tensor]]:
        """Network output ``f`` and ``J v`` for each tangent (one forward-mode pass each)."""
        primals = {name: p.detach() for name, p in self._params.items()}

        def fn(params: dict[str, Tensor]) -> Tensor:
            f = functional_call(self.model, params, (x,))
            return f.unsqueeze(-1) if f.dim() == 1 else f

        split = [self._split(t) for t in tangents]
        if len(split) > 1:
            # one pass for all tangents: the primal is computed once and the tangent products are batched
            stacked = {k: torch.stack([t[k] for t in split]) for k in split[0]}
            try:
                f, jvs = vmap(lambda t: jvp(fn, (primals,), (t,)), out_dims=(None, 0))(stacked)
                return f, list(jvs.unbind(0))
            except RuntimeError:  # an operation without a batching rule: one pass per tangent
                pass
        out = []
        for tangent in split:
            f, jv = jvp(fn, (primals,), (tangent,))
            out.append(jv)
        return f, out

    def _quadratic_model(
        self, x: Tensor, y: Tensor, grad: Matrices, directions: list[Matrices]
    ) -> tuple[Tensor, Tensor]:
        """``D_ij = dᵢᵀ C dⱼ`` with ``C = Ḡ + (λ+τ)I`` (``Ḡ`` the GGN of the batch-mean loss) and ``b_i = dᵢᵀ∇E``."""
        f, jvs = self._jvps(x, directions)
        n = x.shape[0]
        lam_jv = [self.likelihood.output_curvature_apply(f, y, jv) for jv in jvs]
        k = len(directions)
        D = torch.zeros(k, k, dtype=torch.float64)
        b = torch.zeros(k, dtype=torch.float64)
        shift = self.config.weight_decay + self.tau
        for i in range(k):
            b[i] = _dot(directions[i], grad)
            for j in range(i, k):
                value = float((jvs[i] * lam_jv[j]).sum()) / n + shift * _dot(directions[i], directions[j])
                D[i, j] = D[j, i] = value
        return D, b

    def _solve_step(self, x: Tensor, y: Tensor, grad: Matrices, delta: Matrices) -> _Candidate:
        """``α*`` (eq. 4.18), or ``(α, μ)`` with momentum, and the predicted change ``q(Δ) − q(0)``."""
        use_momentum = self.config.momentum and self._previous_update is not None
        directions = [delta, self._previous_update] if use_momentum else [delta]
        D, b = self._quadratic_model(x, y, grad, directions)
        coef = None
        if use_momentum:
            det = float(D[0, 0] * D[1, 1] - D[0, 1] ** 2)
            if det > 1e-12 * float(D[0, 0] * D[1, 1]):
                coef = torch.linalg.solve(D, -b)
            else:
                D, b = D[:1, :1], b[:1]
        if coef is None:
            coef = -b / D[0, 0] if float(D[0, 0]) > 0 else torch.full_like(b, math.nan)
        change = float(coef @ b + 0.5 * coef @ D @ coef)
        alpha = float(coef[0])
        mu = float(coef[1]) if coef.numel() > 1 else 0.0
        return _Candidate(delta, alpha, mu, change)

    # ------------------------------------------------------------------ damping

    def _clamp(self, value: float) -> float:
        return min(max(value, self.config.min_damping), self.config.max_damping)

    def update_tau(self, rho: float) -> None:
        """Levenberg-Marquardt rule (eq. 4.21): shrink ``τ`` by ``ω_τ`` if ``ρ > rho_high``, grow it if ``ρ < rho_low``."""
        cfg = self.config
        if not _finite(rho) or rho < cfg.rho_low:
            self.tau = self._clamp(self.tau / cfg.tau_decay)
        elif rho > cfg.rho_high:
            self.tau = self._clamp(self.tau * cfg.tau_decay)

    def _reject(self) -> None:
        f = self.config.rejection_factor
        self.tau = self._clamp(self.tau * f)
        self.zeta = self._clamp(self.zeta * f)
        self._inverse, self._inverse_zeta = {}, None
        self._previous_update = None
        if not all(bool(torch.isfinite(v).all()) for parts in self.factors.values() for v in parts.values()):
            self.factors, self._eigen = {}, {}  # recompute the curvature at the next step

    # ------------------------------------------------------------------ the step

    def step(self, x: Tensor, y: Tensor) -> StepInfo:
        """One optimisation step on the batch ``(x, y)``; returns its diagnostics."""
        cfg = self.config
        t = self.steps
        self.steps += 1
        loss, grad = self._loss_and_grad(x, y)
        grad_ok = all(bool(torch.isfinite(g).all()) for g in grad.values())
        if not (_finite(loss) and grad_ok):
            if self._previous_params is not None:
                self._set_params(self._previous_params)  # the previous update led here: undo it
                self._previous_params = None
            self._reject()
            return StepInfo(t, loss, 0.0, 0.0, self.tau, self.zeta, math.nan, 0.0, False)

        refreshed = not self.factors or t % cfg.curvature_interval == 0
        if refreshed:
            self._refresh_curvature(x, y)
        zetas = [self.zeta]
        if t > 0 and t % cfg.zeta_interval == 0:
            w = cfg.zeta_decay
            zetas = [self._clamp(self.zeta * w), self.zeta, self._clamp(self.zeta / w)]
        best: _Candidate | None = None
        best_zeta = self.zeta
        best_inverse = None
        try:
            if not self._inverse or t % cfg.inverse_interval == 0 or (refreshed and not self._eigen_ok()):
                self._rebuild_basis()
            for zeta in zetas:
                if self._inverse_zeta is not None and zeta == self._inverse_zeta:
                    inverse = self._inverse
                else:
                    inverse = self._build_inverse(zeta)
                cand = self._solve_step(x, y, grad, self._direction(inverse, grad, zeta))
                if not _finite(cand.model_change):
                    continue
                if best is None or cand.model_change < best.model_change:
                    best, best_zeta, best_inverse = cand, zeta, inverse
        except torch.linalg.LinAlgError:  # a non-finite or indefinite factor: no step from this curvature
            best = None
        if best_inverse is not None:
            self._inverse, self._inverse_zeta = best_inverse, best_zeta
        self.zeta = best_zeta

        update = None
        if best is not None and _finite(best.alpha) and _finite(best.mu):
            update = {k: best.alpha * d for k, d in best.delta.items()}
            if best.mu != 0.0 and self._previous_update is not None:
                update = {k: u + best.mu * self._previous_update[k] for k, u in update.items()}
            if not all(bool(torch.isfinite(u).all()) for u in update.values()):
                update = None
        if update is None:
            self._reject()
            return StepInfo(t, loss, math.nan, math.nan, self.tau, self.zeta, math.nan, math.nan, False)

        self._previous_params = self._matrices({n: p.detach().clone() for n, p in self._params.items()})
        self._add_to_params(update)
        rho = math.nan
        if t % cfg.tau_interval == 0:
            new_loss = self.loss(x, y)
            if not _finite(new_loss):
                self._set_params(self._previous_params)
                self._previous_params = None
                self._reject()
                return StepInfo(t, loss, best.alpha, best.mu, self.tau, self.zeta, math.nan, best.model_change, False)
            rho = (new_loss - loss) / best.model_change if best.model_change != 0 else math.nan
            self.update_tau(rho)
        self._previous_update = update
        return StepInfo(t, loss, best.alpha, best.mu, self.tau, self.zeta, rho, best.model_change, True)

    def run(
        self,
        batches: Iterable[tuple[Tensor, Tensor]],
        max_steps: int | None = None,
        callback: Callable[[StepInfo], bool | None] | None = None,
    ) -> list[StepInfo]:
        """Step over ``batches`` (e.g. a DataLoader) for at most ``max_steps`` steps.

        ``callback(info)`` runs after each step (progress reporting); returning ``False`` stops the run.
        """
        history: list[StepInfo] = []
        for x, y in batches:
            if max_steps is not None and len(history) >= max_steps:
                break
            info = self.step(x, y)
            history.append(info)
            if callback is not None and callback(info) is False:
                break
        return history

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, object]:
        """Everything a bit-for-bit resume needs besides the model's own ``state_dict``."""

        def copy(d):
            return None if d is None else {k: v.clone() for k, v in d.items()}

        return {
            "config": {f.name: getattr(self.config, f.name) for f in fields(self.config)},
            "steps": self.steps,
            "tau": self.tau,
            "zeta": self.zeta,
            "factors": {name: copy(parts) for name, parts in self.factors.items()},
            "inverse": {name: copy(parts) for name, parts in self._inverse.items()},
            "inverse_zeta": self._inverse_zeta,
            "eigen": {name: copy(parts) for name, parts in self._eigen.items()},
            "previous_update": copy(self._previous_update),
            "previous_params": copy(self._previous_params),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore a :meth:`state_dict` (the configuration is taken from the saved state)."""
        names = {layer.name for layer in self.layers}
        if set(state["factors"]) - names:
            raise ValueError(f"State has factors for unknown layers {sorted(set(state['factors']) - names)}.")
        config = dict(state["config"])
        self.config = OptimizerConfig(**config)
        self.steps = int(state["steps"])
        self.tau = float(state["tau"])
        self.zeta = float(state["zeta"])

        def copy(d):
            return None if d is None else {k: v.clone() for k, v in d.items()}

        self.factors = {name: copy(parts) for name, parts in state["factors"].items()}
        self._inverse = {name: copy(parts) for name, parts in state["inverse"].items()}
        self._inverse_zeta = state["inverse_zeta"]
        self._eigen = {name: copy(parts) for name, parts in state["eigen"].items()}
        self._previous_update = copy(state["previous_update"])
        self._previous_params = copy(state["previous_params"])
        self.generator.set_state(state["generator"])

"""Continual learning with Laplace posteriors (thesis §5.3) and the usual baselines.

Tasks ``D_1, D_2, …`` arrive one at a time. After task ``t`` the learner holds a Gaussian ``q_t = N(μ_t, Λ_t⁻¹)``
and trains task ``t+1`` on (thesis eq. 5.21, 5.22)

    ``Σ_n −log p(y_n | x_n, θ) + ½ (θ − μ_t)ᵀ Λ_t (θ − μ_t)``,

sets ``μ_{t+1}`` to the optimum and adds the curvature of the new task, taken at the new optimum (eq. 5.23, with
the multiplier ``λ`` of eq. 5.25 on the new term only):

    ``Λ_{t+1} = λ N_{t+1} C_{t+1}(μ_{t+1}) + Λ_t``,   ``Λ_0 = τ I``.

``C`` is the per-point Gauss-Newton approximation, block-diagonal over layers: ``G ⊗ A`` (KFAC, KFLR, KFRA, rp;
fitted by :func:`curvature.fit_kronecker`) or a diagonal (:func:`curvature.fit_diagonal`); ``N C`` is then the
curvature of the task's summed loss (docs/design.md §3). The variants (:class:`~curvature.options.ContinualMethod`):

* ``online``: ``Λ_t = τ I + λ Σ_{i≤t} N_i C_i(μ_i)``, centred at the latest optimum. Sums of Kronecker products do
  not factorise, so one ``(G_i, A_i)`` pair per task is kept (memory grows with the tasks). Diagonals do add up,
  so the diagonal variant keeps one summed diagonal.
* ``online_sum``: constant memory. The factors of all tasks are averaged with their data counts,
  ``Ḡ = Σ N_i G_i / N``, ``Ā = Σ N_i A_i / N`` (``N = Σ N_i``), and ``Σ_i N_i G_i ⊗ A_i`` is replaced by
  ``N Ḡ ⊗ Ā`` — the factors one would get from one Kronecker fit over the pooled data if every task's
  curvature were taken at the same weights. It is exact when the tasks share their factors; otherwise it adds the
  cross terms ``N_i N_j G_i ⊗ A_j / N``, the same kind of independence assumption that KFAC already makes inside
  a task (the remark after eq. 5.23). For the diagonal curvature it equals ``online``.
* ``ewc``: ``½ τ ‖θ‖² + Σ_i ½ (θ − μ_i)ᵀ λ N_i C_i(μ_i) (θ − μ_i)`` (eq. 5.26), each penalty around its task's optimum.
* ``nononline``: ``Λ_t = τ I + λ Σ_{i≤t} N_i C_i(μ_t)``: every task's curvature recomputed at the latest optimum
  (eq. 5.24). It needs the earlier tasks' data.
* ``si``: Synaptic Intelligence (Zenke et al. 2017): while training task ``ν`` accumulate the path integral
  ``ω_k = Σ_steps −g_k Δθ_k`` of the unregularised loss gradient ``g`` (each step's gradient of the minibatch's mean
  loss times the step taken); after the task, ``Ω_k += ω_k / (Δ_k² + ξ)`` with ``Δ = θ(end of ν) − θ(start of ν)``;
  later tasks add ``c Σ_k Ω_k (θ_k − θ̃_k)²`` to the mean minibatch loss, ``θ̃`` the weights at the end of the previous
  task (the scaling of the paper, so its grid for ``c`` applies).
* ``finetune``: no penalty (the lower bound); ``joint``: each task trains on the union of all data seen so far (the
  upper bound).

All methods keep the prior ``½ τ ‖θ − centre‖²`` (the recursion's ``Λ_0``; centred at the latest optimum for
``online``, ``online_sum`` and ``nononline``, at zero otherwise). Each task minimises, per minibatch ``B`` of a
task of ``N`` examples, ``(1/|B|) Σ_{n∈B} −log p(y_n|x_n, θ) + penalty(θ) / N`` (+ the SI term), whose full-data
minimiser is that of eq. 5.21.

Penalties never form a Kronecker block. With ``Ŵ = [W b]`` flattened row-major (docs/design.md §3) and ``Δ = Ŵ − μ``,

    ``vec(Δ)ᵀ (G ⊗ A) vec(Δ) = tr(Δᵀ G Δ A) = Σ_{oi} Δ ⊙ (G Δ A)``,   gradient ``(G ⊗ A) vec(Δ) = vec(G Δ A)``

(``G``, ``A`` symmetric; the thesis writes ``vec(Δ)ᵀ (A ⊗ G) vec(Δ)`` for column-stacked ``vec``, the same number).
All of a layer's terms around one centre are applied in one batched product.

Serving (:meth:`ContinualLearner.posterior`): the learner's Gaussian has mean = the current weights and precision
``τ I + λ Σ N_i C_i`` (for ``ewc`` the Hessian of its penalty, whose centres differ). A diagonal sum is exact. A sum
of Kronecker terms is made one Kronecker block by :class:`~curvature.options.KronSum`: ``nearest`` (default) takes
the Frobenius-nearest ``X ⊗ Y`` to ``Σ_i N_i G_i ⊗ A_i`` (:func:`nearest_kronecker_sum`), ``sum`` the averaged
factors of ``online_sum`` and ``latest`` the latest task's factors scaled to all ``N`` points. The result is a
:class:`~curvature.LaplacePosterior` with ``n_data = N``, ``n_eff = λ N`` and prior precision ``τ``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields

import torch
from torch import Tensor, nn

from .estimators import DiagonalFactors, KroneckerFactors, LayerFactors, fit_diagonal, fit_kronecker
from .layers import Layer, find_layers
from .likelihoods import Likelihood
from .options import ContinualMethod, ContinualOptimizer, Curvature, KronSum
from .posterior import LaplacePosterior

Progress = Callable[[float, str], None]
TaskData = tuple[Tensor, Tensor]

STATE_FORMAT = "kronlap-continual"
STATE_VERSION = 1
LAPLACE_METHODS = (ContinualMethod.online, ContinualMethod.online_sum, ContinualMethod.ewc, ContinualMethod.nononline)
_PRIOR_AT_LATEST = (ContinualMethod.online, ContinualMethod.online_sum, ContinualMethod.nononline)


# --------------------------------------------------------------------------------------------- quadratic forms
class _KronQuadratic(torch.autograd.Function):
    """``½ Σ_t tr(Δ_tᵀ G_t Δ_t A_t)`` with the gradient ``Σ_t G_t Δ_t A_t`` kept from the forward pass."""

    @staticmethod
    def forward(ctx, delta: Tensor, G: Tensor, A: Tensor) -> Tensor:
        m = _kron_apply(delta, G, A)
        ctx.save_for_backward(delta, G, A, m)
        return 0.5 * (delta * m).sum()

    @staticmethod
    def backward(ctx, grad: Tensor):
        delta, G, A, m = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: the gradient must stay a differentiable function of Δ
            m = _kron_apply(delta, G, A)
        return grad * m, None, None


def _kron_apply(delta: Tensor, G: Tensor, A: Tensor) -> Tensor:
    """``G_t Δ_t A_t`` per term for Δ (T, out, in), or ``Σ_t G_t Δ A_t`` for a shared Δ (out, in)."""
    m = G @ delta @ A
    return m if delta.dim() == 3 else m.sum(0)


def kron_quadratic(delta: Tensor, G: Tensor, A: Tensor) -> Tensor:
    """``½ Σ_t vec(Δ_t)ᵀ (G_t ⊗ A_t) vec(Δ_t) = ½ Σ_t tr(Δ_tᵀ G_t Δ_t A_t)`` without forming ``G_t ⊗ A_t``.

    Row-major ``vec`` (docs/design.md §3); the thesis's column-stacked form is ``vec(Δ)ᵀ (A ⊗ G) vec(Δ)``, the same number.
    The gradient w.r.t. ``Δ`` is ``Σ_t G_t Δ_t A_t``; it is computed once, in the forward pass, so value and
    gradient cost two matrix products per term. Double backward works; ``G`` and ``A`` get no gradient.

    Args:
        delta: (out, in) — shared by every term — or (T, out, in).
        G: (out, out) or (T, out, out), symmetric; scale it to weight a term.
        A: (in, in) or (T, in, in), symmetric.
    """
    if G.dim() == 2:
        G, A = G.unsqueeze(0), A.unsqueeze(0)
    if G.shape[0] != A.shape[0] or (delta.dim() == 3 and delta.shape[0] != G.shape[0]):
        raise ValueError(f"Mismatched terms: Δ {tuple(delta.shape)}, G {tuple(G.shape)}, A {tuple(A.shape)}.")
    if delta.shape[-2] != G.shape[-1] or delta.shape[-1] != A.shape[-1]:
        raise ValueError(f"Δ {tuple(delta.shape)} does not fit G {tuple(G.shape)} and A {tuple(A.shape)}.")
    return _KronQuadratic.apply(delta, G.detach(), A.detach())


def diag_quadratic(delta: Tensor, D: Tensor) -> Tensor:
    """``½ vec(Δ)ᵀ diag(vec D) vec(Δ) = ½ Σ D ⊙ Δ²``."""
    return 0.5 * (D.detach() * delta * delta).sum()


def nearest_kronecker_sum(G: Tensor, A: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """The Frobenius-nearest Kronecker product ``X ⊗ Y`` to ``S = Σ_t w_t G_t ⊗ A_t`` (Van Loan & Pitsianis 1993).

    Rearranging ``S`` as ``R = Σ_t w_t vec(G_t) vec(A_t)ᵀ`` turns the problem into the best rank-one approximation
    of ``R``: ``X = σ·u``, ``Y = v`` with ``(σ, u, v)`` its top singular triple. ``u`` and ``v`` lie in the spans
    of the ``G_t`` and ``A_t``, so with the Gram matrices ``K_G = [⟨G_s, G_t⟩]``, ``K_A`` the problem is the SVD of
    the T × T core ``S_G^½ V_Gᵀ W V_A S_A^½`` (``K = V S Vᵀ``). For positive semi-definite factors the Gram
    matrices are entry-wise non-negative and so are the combination weights, so ``X`` and ``Y`` are positive
    semi-definite. Exact when all ``G_t`` (or all ``A_t``) are proportional.

    Args:
        G: (T, out, out); A: (T, in, in); weights: (T,) non-negative.
    Returns:
        ``(X, Y)`` with ``‖Y‖_F = 1``.
    """
    dtype = G.dtype
    g = G.reshape(G.shape[0], -1).to(torch.float64)
    a = A.reshape(A.shape[0], -1).to(torch.float64)
    w = weights.to(torch.float64)

    def basis(m: Tensor) -> tuple[Tensor, Tensor]:
        s, v = torch.linalg.eigh(m @ m.T)
        keep = s > s.max() * 1e-12
        return s[keep].sqrt(), v[:, keep]

    sg, vg = basis(g)
    sa, va = basis(a)
    core = sg[:, None] * (vg.T @ torch.diag(w) @ va) * sa[None, :]
    p, sigma, q = torch.linalg.svd(core)
    alpha = vg @ (p[:, 0] / sg)  # u = Σ_t α_t vec(G_t), ‖u‖ = 1
    beta = va @ (q[0] / sa)
    if alpha.sum() < 0:
        alpha, beta = -alpha, -beta
    alpha, beta = alpha.clamp_min(0), beta.clamp_min(0)  # round-off only: the exact weights are non-negative
    X = sigma[0] * (alpha @ g).reshape(G.shape[1:])
    Y = (beta @ a).reshape(A.shape[1:])
    return X.to(dtype), Y.to(dtype)


# -------------------------------------------------------------------------------------------------- config
@dataclass
class ContinualConfig:
    """Everything that shapes a continual-learning run (JSON-able).

    Attributes:
        method: see :class:`~curvature.options.ContinualMethod`.
        curvature: ``kflr``, ``kfac``, ``kfra``, ``rp`` or ``diag`` (the exact GGN diagonal).
        strength: ``λ`` for the Laplace methods (eq. 5.25; thesis grid 1, 3, 10, 30, 100), ``c`` for SI
            (grid 0.01 … 1); unused by ``finetune`` and ``joint``.
        prior_precision: ``τ`` of the initial prior ``N(0, τ⁻¹ I)``.
        epochs: passes over each task's training data (L-BFGS: outer steps of up to ``lbfgs_iterations``).
        batch_size: minibatch size of the optimiser.
        optimizer: ``adam``, ``sgd`` or ``lbfgs`` (full batch, strong-Wolfe line search).
        lr: learning rate of task 0; task ``t`` uses ``lr / (1 + lr_decay·t)`` (the thesis's per-task decay).
        momentum, nesterov: SGD momentum.
        si_damping: ``ξ`` of SI.
        mc_samples: sampled targets per example for ``kfac`` / ``rp``.
        curvature_batch_size: examples per pass of the curvature fit.
        seed: seeds the minibatch order and the curvature sampling of each task (from the task's index, so a
            resumed run draws what an uninterrupted one would).
    """

    method: ContinualMethod = ContinualMethod.online
    curvature: Curvature = Curvature.kflr
    strength: float = 1.0
    prior_precision: float = 1.0
    epochs: int = 10
    batch_size: int = 128
    optimizer: ContinualOptimizer = ContinualOptimizer.adam
    lr: float = 1e-3
    lr_decay: float = 0.0
    momentum: float = 0.9
    nesterov: bool = False
    si_damping: float = 1e-3
    mc_samples: int = 1
    curvature_batch_size: int = 512
    lbfgs_iterations: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        for key, enum in (("method", ContinualMethod), ("curvature", Curvature), ("optimizer", ContinualOptimizer)):
            try:
                setattr(self, key, enum(getattr(self, key)))
            except ValueError:
                raise ValueError(
                    f"{key} must be one of {[e.value for e in enum]}, got {getattr(self, key)!r}."
                ) from None
        positive = {
            "lr": self.lr,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "mc_samples": self.mc_samples,
            "curvature_batch_size": self.curvature_batch_size,
            "lbfgs_iterations": self.lbfgs_iterations,
        }
        for key, value in positive.items():
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{key} must be positive, got {value!r}.")
        for key in ("strength", "prior_precision", "lr_decay", "momentum", "si_damping"):
            value = getattr(self, key)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{key} must be non-negative and finite, got {value!r}.")
        if self.method == ContinualMethod.si and self.optimizer == ContinualOptimizer.lbfgs:
            raise ValueError("SI integrates the loss along the optimiser's steps; use adam or sgd.")
        if self.seed < 0:
            raise ValueError(f"seed must be non-negative, got {self.seed}.")

    @property
    def kronecker(self) -> bool:
        return self.curvature != Curvature.diag

    @property
    def needs_history(self) -> bool:
        """Whether learning a task needs the earlier tasks' training data."""
        return self.method in (ContinualMethod.nononline, ContinualMethod.joint)

    def to_json(self) -> dict:
        return {k: (str(v) if isinstance(v, str) else v) for k, v in asdict(self).items()}


# -------------------------------------------------------------------------------------------------- state
@dataclass
class CurvatureTerm:
    """``½ (θ − μ_c)ᵀ λ·n_data·C (θ − μ_c)`` with ``C`` per layer: ``(G, A)`` or a diagonal (data averages)."""

    centre: int  # index into ContinualLearner.centres
    n_data: int
    kron: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    diag: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class TaskReport:
    """What learning one task did."""

    task: int
    n_train: int
    final_loss: float
    train_seconds: float
    curvature_seconds: float


class ContinualLearner:
    """Learns a sequence of tasks with one network; after every task its state is a servable Laplace posterior.

    Example::

        cfg = ContinualConfig(method="online", curvature="kflr", strength=3.0)
        learner = ContinualLearner(model, CrossEntropy(), cfg)
        for t, (train, val) in enumerate(tasks):          # (x, y) pairs
            learner.learn_task(train, previous=[tr for tr, _ in tasks[:t]], progress=print)
            learner.record_accuracy([v for _, v in tasks[: t + 1]])     # row R[t]
            blob = learner.to_bytes()                      # checkpoint; resume with from_bytes
        post = learner.posterior()                         # a curvature.LaplacePosterior on the latest weights

    :func:`run_tasks` is this loop, starting at the task a restored learner stopped before.

    Args:
        model: the network; trained in place. Its Linear / Conv2d layers carry the penalties.
        likelihood: e.g. :class:`~curvature.CrossEntropy`.
        config: a :class:`ContinualConfig` (or keyword arguments for one).
    """

    def __init__(self, model: nn.Module, likelihood: Likelihood, config: ContinualConfig | None = None, **kwargs):
        if config is not None and kwargs:
            raise ValueError("Pass either a config or keyword options, not both.")
        self.model = model
        self.likelihood = likelihood
        self.config = config if config is not None else ContinualConfig(**kwargs)
        self.layers: list[Layer] = find_layers(model)
        self.task_sizes: list[int] = []
        self.accuracy: list[list[float]] = []
        self.reports: list[dict] = []
        self.centres: list[dict[str, Tensor]] = []
        self.terms: list[CurvatureTerm] = []
        self.si_omega: dict[str, Tensor] = {}
        self.si_reference: dict[str, Tensor] = {}
        self._compiled: dict | None = None

    # ------------------------------------------------------------------------------------------- basics
    @property
    def n_tasks(self) -> int:
        """Tasks learned so far (the index of the next task)."""
        return len(self.task_sizes)

    @property
    def n_seen(self) -> int:
        """Training examples seen over all tasks."""
        return sum(self.task_sizes)

    def weights(self) -> dict[str, Tensor]:
        """Every layer's ``Ŵ = [W b]`` (differentiable w.r.t. the model's parameters)."""
        return {layer.name: layer.handler.weight_matrix(layer.module) for layer in self.layers}

    def _snapshot(self) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in self.weights().items()}

    # ------------------------------------------------------------------------------------------ penalty
    def _compile(self) -> dict:
        """Group the terms per layer and centre, pre-scaled, so the penalty is one batched product per group."""
        lam = self.config.strength
        groups: dict[str, dict[int, dict]] = {layer.name: {} for layer in self.layers}
        for term in self.terms:
            w = lam * term.n_data
            for name, group in groups.items():
                g = group.setdefault(term.centre, {"G": [], "A": [], "D": None})
                if name in term.kron:
                    G, A = term.kron[name]
                    g["G"].append(w * G)
                    g["A"].append(A)
                if name in term.diag:
                    d = w * term.diag[name]
                    g["D"] = d if g["D"] is None else g["D"] + d
        compiled = {}
        for name, group in groups.items():
            compiled[name] = [
                (c, torch.stack(g["G"]) if g["G"] else None, torch.stack(g["A"]) if g["A"] else None, g["D"])
                for c, g in group.items()
            ]
        return compiled

    def penalty(self, weights: dict[str, Tensor] | None = None) -> Tensor:
        """The quadratic penalty of the earlier tasks plus the prior: ``½τ‖θ − centre‖² + Σ_terms ½ ΔᵀλNCΔ``.

        This is the (unnormalised) negative log prior the next task trains under; for SI it holds the prior only
        (see :meth:`si_penalty`). ``weights`` (per layer ``Ŵ``) default to the model's current ones.
        """
        weights = self.weights() if weights is None else weights
        if self._compiled is None:
            self._compiled = self._compile()
        tau = self.config.prior_precision
        prior_centre = self.centres[-1] if (self.config.method in _PRIOR_AT_LATEST and self.centres) else None
        total = weights[self.layers[0].name].new_zeros(())
        for layer in self.layers:
            w = weights[layer.name]
            if tau > 0:
                d = w if prior_centre is None else w - prior_centre[layer.name]
                total = total + 0.5 * tau * (d * d).sum()
            for c, G, A, D in self._compiled[layer.name]:
                delta = w - self.centres[c][layer.name]
                if G is not None:
                    total = total + kron_quadratic(delta, G, A)
                if D is not None:
                    total = total + diag_quadratic(delta, D)
        return total

    def si_penalty(self, weights: dict[str, Tensor] | None = None) -> Tensor:
        """SI's surrogate ``c Σ_k Ω_k (θ_k − θ̃_k)²`` (zero before the first task and for other methods)."""
        if not self.si_omega:
            return torch.zeros((), dtype=self.layers[0].module.weight.dtype, device=self.layers[0].module.weight.device)
        weights = self.weights() if weights is None else weights
        total = weights[self.layers[0].name].new_zeros(())
        for name, omega in self.si_omega.items():
            d = weights[name] - self.si_reference[name]
            total = total + self.config.strength * (omega * d * d).sum()
        return total

    # ----------------------------------------------------------------------------------------- training
    def _generator(self, task: int, stream: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.config.seed * 1_000_003 + 2 * task + stream)

    def _optimizer(self, params: list[Tensor], task: int) -> torch.optim.Optimizer:
        cfg = self.config
        lr = cfg.lr / (1.0 + cfg.lr_decay * task)
        if cfg.optimizer == ContinualOptimizer.adam:
            return torch.optim.Adam(params, lr=lr)
        if cfg.optimizer == ContinualOptimizer.sgd:
            return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
        return torch.optim.LBFGS(
            params,
            lr=lr,
            max_iter=cfg.lbfgs_iterations,
            tolerance_grad=1e-14,
            tolerance_change=0.0,
            history_size=50,
            line_search_fn="strong_wolfe",
        )

    def objective(self, x: Tensor, y: Tensor, n_task: int) -> Tensor:
        """Mean negative log-likelihood of the batch plus ``penalty / n_task`` plus SI's surrogate."""
        return self.likelihood.nll(self.model(x), y) / len(x) + self.penalty() / n_task + self.si_penalty()

    def learn_task(
        self,
        data: TaskData,
        previous: Sequence[TaskData] = (),
        progress: Progress | None = None,
    ) -> TaskReport:
        """Train on one task under the current penalty, then fit its curvature at the new optimum (consolidate).

        Args:
            data: the task's training ``(x, y)``.
            previous: the training data of every earlier task, in order; needed by ``nononline`` and ``joint``,
                ignored by the others.
            progress: ``callable(fraction, message)`` after every epoch and after the curvature fit.
        """
        cfg = self.config
        t = self.n_tasks
        if cfg.needs_history and len(previous) != t:
            raise ValueError(
                f"Method {cfg.method.value!r} needs the training data of all {t} earlier tasks, got {len(previous)}."
            )
        x, y = data
        if len(x) != len(y) or len(x) == 0:
            raise ValueError(f"Task data must be non-empty (x, y) of equal length, got {len(x)} and {len(y)}.")
        if cfg.method == ContinualMethod.joint and t:
            x = torch.cat([p[0] for p in previous] + [x])
            y = torch.cat([p[1] for p in previous] + [y])
        started = time.perf_counter()
        loss = self._train(x, y, t, progress)
        trained = time.perf_counter()
        self._consolidate(data, previous, t)
        self.task_sizes.append(len(data[0]))
        report = TaskReport(t, len(x), loss, trained - started, time.perf_counter() - trained)
        self.reports.append(asdict(report))
        if progress is not None:
            progress(1.0, f"task {t}: trained (loss {loss:.4f}) and consolidated")
        return report

    def _train(self, x: Tensor, y: Tensor, task: int, progress: Progress | None) -> float:
        cfg = self.config
        device, dtype = _device_dtype(self.model)
        x = x.to(device=device, dtype=dtype if x.is_floating_point() else None)
        y = y.to(device=device)
        params = [p for layer in self.layers for p in layer.module.parameters() if p.requires_grad]
        opt = self._optimizer(params, task)
        self._compiled = None
        n = len(x)
        gen = self._generator(task, 0)
        si = cfg.method == ContinualMethod.si
        omega = {layer.name: torch.zeros(layer.shape, dtype=dtype, device=device) for layer in self.layers}
        start = self._snapshot() if si else None
        was_training = self.model.training
        self.model.train()
        last = math.nan
        try:
            for epoch in range(cfg.epochs):
                if cfg.optimizer == ContinualOptimizer.lbfgs:

                    def closure():
                        opt.zero_grad()
                        value = self.objective(x, y, n)
                        value.backward()
                        return value

                    last = float(opt.step(closure).detach())
                else:
                    total, count = 0.0, 0
                    for idx in torch.randperm(n, generator=gen).split(cfg.batch_size):
                        xb, yb = x[idx.to(device)], y[idx.to(device)]
                        opt.zero_grad()
                        data_loss = self.likelihood.nll(self.model(xb), yb) / len(idx)
                        data_loss.backward()
                        if si:
                            grads = {name: g.clone() for name, g in _layer_grads(self.layers).items()}
                            before = self._snapshot()
                        reg = self.penalty() / n + self.si_penalty()
                        if reg.requires_grad:
                            reg.backward()
                        opt.step()
                        if si:
                            after = self._snapshot()
                            for name in omega:
                                omega[name] -= grads[name] * (after[name] - before[name])
                        total += float(data_loss.detach()) * len(idx)
                        count += len(idx)
                    last = total / count
                if not math.isfinite(last):
                    raise FloatingPointError(f"Training diverged on task {task} (loss {last}); lower lr or strength.")
                if progress is not None:
                    progress(
                        (epoch + 1) / (cfg.epochs + 1), f"task {task}: epoch {epoch + 1}/{cfg.epochs}, loss {last:.4f}"
                    )
        finally:
            self.model.train(was_training)
        if si:
            end = self._snapshot()
            for name, w in omega.items():
                delta = end[name] - start[name]
                add = w / (delta * delta + cfg.si_damping)
                self.si_omega[name] = self.si_omega[name] + add if name in self.si_omega else add
        return last

    def _fit_curvature(self, data: TaskData, task: int, index: int):
        cfg = self.config
        gen = self._generator(task, 1)
        if index:
            gen.manual_seed(gen.initial_seed() + 7919 * index)
        if cfg.kronecker:
            return fit_kronecker(
                self.model,
                data,
                self.likelihood,
                method=cfg.curvature.value,
                mc_samples=cfg.mc_samples,
                batch_size=cfg.curvature_batch_size,
                generator=gen,
            )
        return fit_diagonal(self.model, data, self.likelihood, method="ggn", batch_size=cfg.curvature_batch_size)

    def _term(self, factors, centre: int) -> CurvatureTerm:
        if isinstance(factors, DiagonalFactors):
            return CurvatureTerm(centre, int(factors.n_data), diag={k: v.detach().clone() for k, v in factors.items()})
        return CurvatureTerm(
            centre,
            int(factors.n_data),
            kron={k: (f.G.detach().clone(), f.A.detach().clone()) for k, f in factors.items()},
        )

    def _consolidate(self, data: TaskData, previous: Sequence[TaskData], task: int) -> None:
        """Update the penalty after task ``task`` was trained (the projection step, eq. 5.22-5.25)."""
        method = self.config.method
        self._compiled = None
        mean = self._snapshot()
        if method == ContinualMethod.si:
            self.si_reference = {k: v.clone() for k, v in mean.items()}
            self.centres = [mean]
            return
        if method in (ContinualMethod.finetune, ContinualMethod.joint):
            self.centres = [mean]
            return
        if method == ContinualMethod.nononline:
            self.centres = [mean]
            self.terms = [self._term(self._fit_curvature(d, task, i), 0) for i, d in enumerate([*previous, data])]
            return
        new = self._term(self._fit_curvature(data, task, 0), 0)
        if method == ContinualMethod.ewc:
            self.centres.append(mean)
            new.centre = len(self.centres) - 1
            self.terms.append(new)
            return
        self.centres = [mean]
        if not self.terms or (method == ContinualMethod.online and self.config.kronecker):
            self.terms.append(new)
            return
        old = self.terms[0]  # online_sum, and online with diagonals: one running term
        n = old.n_data + new.n_data
        a, b = old.n_data / n, new.n_data / n
        merged = CurvatureTerm(0, n)
        for name in new.kron:
            (g0, a0), (g1, a1) = old.kron[name], new.kron[name]
            merged.kron[name] = (a * g0 + b * g1, a * a0 + b * a1)
        for name in new.diag:
            merged.diag[name] = a * old.diag[name] + b * new.diag[name]
        self.terms = [merged]

    # --------------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, sets: Sequence[TaskData], batch_size: int = 2048) -> list[float]:
        """Classification accuracy of the current weights on each ``(x, y)``."""
        device, dtype = _device_dtype(self.model)
        was_training = self.model.training
        self.model.eval()
        try:
            out = []
            for x, y in sets:
                correct = 0
                for i in range(0, len(x), batch_size):
                    xb = x[i : i + batch_size].to(device=device, dtype=dtype)
                    correct += int((self.model(xb).argmax(-1).cpu() == y[i : i + batch_size].cpu()).sum())
                out.append(correct / max(len(x), 1))
            return out
        finally:
            self.model.train(was_training)

    def record_accuracy(self, sets: Sequence[TaskData]) -> list[float]:
        """Append row ``R[i]`` (accuracy on each of the given tasks after the latest task) to :attr:`accuracy`."""
        if len(self.accuracy) >= self.n_tasks:
            raise ValueError(f"A row is already recorded for task {self.n_tasks - 1}.")
        row = self.evaluate(sets)
        while len(self.accuracy) < self.n_tasks - 1:  # keep R[i] aligned with task i
            self.accuracy.append([])
        self.accuracy.append(row)
        return row

    # ------------------------------------------------------------------------------------------ serving
    def posterior(
        self,
        approximation: KronSum | str = KronSum.nearest,
        data: TaskData | None = None,
        prior_precision: float | None = None,
    ) -> LaplacePosterior:
        """The current Gaussian as a :class:`~curvature.LaplacePosterior` on the model's current weights.

        Laplace methods: precision ``τ I + λ Σ_i N_i C_i`` (see the module docstring for how a Kronecker sum
        becomes one block), ``n_data = N`` (all tasks), ``n_eff = λ N``. ``si``, ``finetune`` and ``joint`` hold
        no curvature: pass ``data`` to fit the configured curvature on it at the current weights (``n_eff`` = its
        size). A prior precision of 0 is served as 1e-8 (the posterior needs a proper prior).
        """
        approximation = KronSum(approximation)
        tau = self.config.prior_precision if prior_precision is None else float(prior_precision)
        tau = tau if tau > 0 else 1e-8
        method = self.config.method
        if method not in LAPLACE_METHODS:
            if data is None:
                raise ValueError(f"Method {method.value!r} holds no curvature; pass data to fit a posterior on.")
            factors = self._fit_curvature(data, self.n_tasks, 99)
            return LaplacePosterior(self.model, factors, self.likelihood, prior_precision=tau)
        if not self.terms:
            raise ValueError("No task has been learned yet.")
        n = sum(term.n_data for term in self.terms)
        names = [layer.name for layer in self.layers]
        if not self.config.kronecker:
            diag = {k: sum(t.n_data * t.diag[k] for t in self.terms) / n for k in names}
            factors = DiagonalFactors(diag, n_data=n, method="ggn")
        else:
            layers = {}
            for k in names:
                G = torch.stack([t.kron[k][0] for t in self.terms])
                A = torch.stack([t.kron[k][1] for t in self.terms])
                counts = torch.tensor([float(t.n_data) for t in self.terms], dtype=torch.float64)
                layers[k] = _combine(G, A, counts, approximation)
            factors = KroneckerFactors(layers, n_data=n, method=self.config.curvature.value)
        post = LaplacePosterior(
            self.model, factors, self.likelihood, n_eff=self.config.strength * n, prior_precision=tau
        )
        post.metadata.update({"continual_method": method.value, "kron_sum": approximation.value, "tasks": self.n_tasks})
        return post

    # ------------------------------------------------------------------------------------ serialisation
    def state_dict(self) -> tuple[dict[str, Tensor], dict]:
        """``(tensors, meta)``: every tensor by a flat key, and JSON-able metadata (no pickle).

        Holds the model's parameters and buffers (the posterior mean), the penalty terms and centres, SI's
        importances, the accuracy matrix, task sizes and the config.
        """
        tensors: dict[str, Tensor] = {}
        for k, v in self.model.state_dict().items():
            tensors[f"model/{k}"] = v
        names = [layer.name for layer in self.layers]
        for c, centre in enumerate(self.centres):
            for i, k in enumerate(names):
                tensors[f"centre/{c}/{i}"] = centre[k]
        terms_meta = []
        for j, term in enumerate(self.terms):
            for i, k in enumerate(names):
                if k in term.kron:
                    tensors[f"term/{j}/{i}/G"], tensors[f"term/{j}/{i}/A"] = term.kron[k]
                if k in term.diag:
                    tensors[f"term/{j}/{i}/D"] = term.diag[k]
            terms_meta.append({"centre": term.centre, "n_data": term.n_data})
        for i, k in enumerate(names):
            if k in self.si_omega:
                tensors[f"si/omega/{i}"] = self.si_omega[k]
                tensors[f"si/reference/{i}"] = self.si_reference[k]
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        meta = {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "config": self.config.to_json(),
            "likelihood": self.likelihood.name,
            "layers": [[layer.name, list(layer.shape)] for layer in self.layers],
            "task_sizes": list(self.task_sizes),
            "accuracy": [list(r) for r in self.accuracy],
            "reports": list(self.reports),
            "n_centres": len(self.centres),
            "terms": terms_meta,
        }
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, Tensor], meta: dict) -> None:
        """Restore a state from :meth:`state_dict` (weights included) to continue with the next task.

        The method, curvature, strength, prior precision and seed must match this learner's config; training
        settings (epochs, optimiser, learning rate) may differ.

        Raises:
            ValueError: not a continual-learning state, or one for another model or method.
        """
        if meta.get("format") != STATE_FORMAT or meta.get("version") != STATE_VERSION:
            raise ValueError("Not a kronlap continual-learning state (format/version mismatch).")
        saved = ContinualConfig(**meta["config"])
        for key in ("method", "curvature", "strength", "prior_precision", "seed", "si_damping"):
            if getattr(saved, key) != getattr(self.config, key):
                raise ValueError(
                    f"The state was made with {key}={getattr(saved, key)!r}, this learner has "
                    f"{getattr(self.config, key)!r}."
                )
        if meta["layers"] != [[layer.name, list(layer.shape)] for layer in self.layers]:
            raise ValueError("The model's layers do not match those of the saved state.")
        if meta["likelihood"] != self.likelihood.name:
            raise ValueError(f"The state was made with a {meta['likelihood']!r} likelihood.")
        device, dtype = _device_dtype(self.model)

        def get(key: str) -> Tensor:
            if key not in tensors:
                raise ValueError(f"The state lacks tensor {key!r}.")
            t = tensors[key]
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        model_state = {k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")}
        self.model.load_state_dict(model_state)
        names = [layer.name for layer in self.layers]
        self.centres = [{k: get(f"centre/{c}/{i}") for i, k in enumerate(names)} for c in range(meta["n_centres"])]
        self.terms = []
        for j, tm in enumerate(meta["terms"]):
            term = CurvatureTerm(int(tm["centre"]), int(tm["n_data"]))
            for i, k in enumerate(names):
                if f"term/{j}/{i}/G" in tensors:
                    term.kron[k] = (get(f"term/{j}/{i}/G"), get(f"term/{j}/{i}/A"))
                if f"term/{j}/{i}/D" in tensors:
                    term.diag[k] = get(f"term/{j}/{i}/D")
            self.terms.append(term)
        self.si_omega = {k: get(f"si/omega/{i}") for i, k in enumerate(names) if f"si/omega/{i}" in tensors}
        self.si_reference = {k: get(f"si/reference/{i}") for i, k in enumerate(names) if f"si/omega/{i}" in tensors}
        self.task_sizes = [int(n) for n in meta["task_sizes"]]
        self.accuracy = [list(map(float, r)) for r in meta["accuracy"]]
        self.reports = list(meta.get("reports", []))
        self._compiled = None

    def to_bytes(self) -> bytes:
        """The state as safetensors bytes with the metadata as a JSON header entry."""
        from safetensors.torch import save

        tensors, meta = self.state_dict()
        return save(tensors, metadata={"kronlap": json.dumps(meta)})

    @classmethod
    def from_bytes(cls, blob: bytes, model: nn.Module, likelihood: Likelihood, **overrides) -> ContinualLearner:
        """A learner restored from :meth:`to_bytes` onto ``model``; ``overrides`` change training settings only."""
        tensors, meta = read_state(blob)
        cfg = dict(meta["config"])
        unknown = set(overrides) - {f.name for f in fields(ContinualConfig)}
        if unknown:
            raise ValueError(f"Unknown config options {sorted(unknown)}.")
        cfg.update(overrides)
        learner = cls(model, likelihood, ContinualConfig(**cfg))
        learner.load_state_dict(tensors, meta)
        return learner


def read_state(blob: bytes) -> tuple[dict[str, Tensor], dict]:
    """``(tensors, meta)`` of a state saved by :meth:`ContinualLearner.to_bytes` (no pickle)."""
    from safetensors.torch import load

    try:
        tensors = load(bytes(blob))
        header_len = int.from_bytes(bytes(blob[:8]), "little")
        meta = json.loads(json.loads(bytes(blob[8 : 8 + header_len]))["__metadata__"]["kronlap"])
    except Exception as exc:  # noqa: BLE001 - any decoding failure means "not ours"
        raise ValueError(f"Not a kronlap continual-learning state: {exc}") from None
    if meta.get("format") != STATE_FORMAT:
        raise ValueError("Not a kronlap continual-learning state.")
    return tensors, meta


def run_tasks(
    learner: ContinualLearner,
    tasks: Sequence[tuple[TaskData, TaskData]],
    progress: Progress | None = None,
    checkpoint: Callable[[ContinualLearner], None] | None = None,
) -> list[list[float]]:
    """Learn ``tasks[learner.n_tasks:]`` in order, recording the accuracy matrix, and return it.

    ``tasks`` holds ``(train, val)`` pairs from task 0 on: a fresh learner starts at task 0, a restored one at
    the task it stopped before (resume, or ``continue_from`` with new tasks appended). Earlier entries provide
    the validation sets of row ``R[i]`` (accuracy on tasks ``0..i`` after task ``i``) and the earlier training
    data that ``nononline`` and ``joint`` need. ``checkpoint(learner)`` runs after every task; ``progress``
    gets the fraction of the remaining work.
    """
    start = learner.n_tasks
    todo = len(tasks) - start
    if todo < 0:
        raise ValueError(f"The learner has already learned {start} tasks; got only {len(tasks)}.")
    for t in range(start, len(tasks)):

        def sub(f: float, msg: str, t: int = t) -> None:
            if progress is not None:
                progress((t - start + min(max(f, 0.0), 1.0)) / todo, msg)

        learner.learn_task(tasks[t][0], previous=[tr for tr, _ in tasks[:t]], progress=sub)
        learner.record_accuracy([val for _, val in tasks[: t + 1]])
        if checkpoint is not None:
            checkpoint(learner)
    return learner.accuracy


# ------------------------------------------------------------------------------------------------- helpers
def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


def _layer_grads(layers: list[Layer]) -> dict[str, Tensor]:
    """Each layer's gradient as an (out, in+1) matrix laid out like ``Ŵ = [W b]``."""
    out = {}
    for layer in layers:
        m = layer.module
        g = (
            m.weight.grad.reshape(m.weight.shape[0], -1)
            if m.weight.grad is not None
            else torch.zeros_like(m.weight).reshape(m.weight.shape[0], -1)
        )
        if m.bias is not None:
            gb = m.bias.grad if m.bias.grad is not None else torch.zeros_like(m.bias)
            g = torch.cat([g, gb[:, None]], 1)
        out[layer.name] = g
    return out


def _combine(G: Tensor, A: Tensor, counts: Tensor, approximation: KronSum) -> LayerFactors:
    """Factors ``(G, A)`` with ``N (G ⊗ A) ≈ Σ_t N_t G_t ⊗ A_t``, ``N = Σ N_t``; ``A`` keeps the average trace."""
    n = float(counts.sum())
    w = (counts / n).to(G.dtype)
    a_avg = (w[:, None, None] * A).sum(0)
    if approximation == KronSum.sum or len(counts) == 1:
        return LayerFactors(A=a_avg, G=(w[:, None, None] * G).sum(0))
    if approximation == KronSum.latest:
        return LayerFactors(A=A[-1], G=G[-1])
    X, Y = nearest_kronecker_sum(G, A, w)
    scale = torch.trace(a_avg) / torch.trace(Y).clamp_min(torch.finfo(Y.dtype).tiny)
    return LayerFactors(A=scale * Y, G=X / scale)


__all__ = [
    "LAPLACE_METHODS",
    "ContinualConfig",
    "ContinualLearner",
    "CurvatureTerm",
    "TaskReport",
    "diag_quadratic",
    "kron_quadratic",
    "nearest_kronecker_sum",
    "read_state",
    "run_tasks",
]

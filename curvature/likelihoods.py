"""Likelihoods and their output-space curvature.

For a network output ``f`` (n, C) each likelihood provides

* ``nll(f, y)``: the summed negative log-likelihood;
* ``hessian_sqrt(f, y)``: ``S`` (n, C, K) with ``S Sᵀ = Λ``, the Gauss-Newton output curvature (thesis
  Definition 3.19), used by KFLR, KFRA and the exact GGN diagonal;
* ``fisher_sqrt(f)``: the same for the output Fisher ``E_{ŷ~p}[∇ℓ ∇ℓᵀ]`` (equal to ``Λ`` for exponential
  families with natural-parameter outputs, thesis §3.5.1);
* ``sampled_gradients(f, m)``: ``∇_f −log p(ŷ_j|f) / √m`` for ``m`` targets ``ŷ_j`` sampled from the model
  (n, C, m), the KFAC estimator of the output Fisher (thesis eq. 4.9).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor

from .options import LikelihoodName


class Likelihood(ABC):
    """Interface shared by every likelihood."""

    name: str = "likelihood"
    #: True when the GGN output curvature does not depend on the targets.
    target_free_curvature: bool = True

    @abstractmethod
    def nll(self, f: Tensor, y: Tensor) -> Tensor:
        """Summed negative log-likelihood of targets ``y`` under outputs ``f``."""

    @abstractmethod
    def hessian_sqrt(self, f: Tensor, y: Tensor | None = None) -> Tensor:
        """(n, C, K) square root of the GGN output curvature."""

    def fisher_sqrt(self, f: Tensor) -> Tensor:
        """(n, C, K) square root of the output Fisher."""
        return self.hessian_sqrt(f)

    def hessian_sqrt_diagonal(self, f: Tensor, y: Tensor | None = None) -> Tensor | None:
        """(n, C) ``s`` with ``Λ_n = diag(s_n)²`` where the output curvature is diagonal, else ``None``.

        Lets estimators scale rows instead of multiplying by the dense ``diag_embed(s)``.
        """
        return None

    def output_curvature_sum(self, f: Tensor, y: Tensor | None = None) -> Tensor:
        """(C, C) ``Σ_n Λ_n``, the GGN output curvature summed over the batch (KFRA's ``Ḡ_L`` before averaging)."""
        s = self.hessian_sqrt(f, y)
        return torch.einsum("nck,ndk->cd", s, s)

    def output_curvature_apply(self, f: Tensor, y: Tensor | None, v: Tensor) -> Tensor:
        """(n, C) ``Λ_n v_n`` for output-space vectors ``v`` (n, C): the middle of a GGN-vector product."""
        s = self.hessian_sqrt(f, y)
        return torch.einsum("nck,ndk,nd->nc", s, s, v)

    @abstractmethod
    def sampled_gradients(self, f: Tensor, m: int, generator: torch.Generator | None = None) -> Tensor:
        """(n, C, m) gradients of ``−log p(ŷ|f)`` for sampled ``ŷ``, scaled by ``1/√m``."""

    def random_projection(self, f: Tensor, y: Tensor | None, m: int, generator: torch.Generator | None = None):
        """``S v / √m`` with ``v ~ N(0, I)`` (thesis eq. 4.11): an unbiased rank-m estimate of ``Λ``."""
        s = self.hessian_sqrt(f, y)
        v = torch.randn(s.shape[0], s.shape[2], m, dtype=f.dtype, device=f.device, generator=generator)
        return (s @ v) / math.sqrt(m)


class CrossEntropy(Likelihood):
    """Softmax categorical likelihood over logits ``f``; integer targets."""

    name = "classification"

    def nll(self, f: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(f, y, reduction="sum")

    def hessian_sqrt(self, f: Tensor, y: Tensor | None = None) -> Tensor:
        """(n, C, C−1) square root of ``Λ = diag(p) − p pᵀ`` (rank C − 1).

        ``S = diag(√p) − p √pᵀ`` satisfies ``S Sᵀ = Λ`` (as ``Σ_c p_c = 1``) and ``S u = 0`` for the unit vector
        ``u = √p``. With the Householder reflection ``H`` that maps ``e_C`` to ``−u``, ``S H`` has a zero last
        column, so its first ``C − 1`` columns are an exact square root: one backward pass fewer per example.
        """
        p = torch.softmax(f, dim=-1)
        sp = p.sqrt()
        s = torch.diag_embed(sp) - p.unsqueeze(-1) * sp.unsqueeze(-2)
        if f.shape[-1] == 1:
            return s
        v = sp.clone()
        v[..., -1] += 1.0  # v = u + e_C; vᵀv = 2 + 2 u_C ≥ 2, so the reflection is well conditioned
        # S H = S − 2 (S v) vᵀ / (vᵀ v), and S v = S e_C (because S u = 0)
        coef = 2.0 / (v * v).sum(-1, keepdim=True)
        sh = s - (s[..., -1:] * coef.unsqueeze(-1)) * v.unsqueeze(-2)
        return sh[..., :-1]

    def output_curvature_sum(self, f: Tensor, y: Tensor | None = None) -> Tensor:
        p = torch.softmax(f, dim=-1)
        return torch.diag(p.sum(0)) - p.T @ p

    def output_curvature_apply(self, f: Tensor, y: Tensor | None, v: Tensor) -> Tensor:
        p = torch.softmax(f, dim=-1)
        return p * v - p * (p * v).sum(-1, keepdim=True)

    def sampled_gradients(self, f: Tensor, m: int, generator: torch.Generator | None = None) -> Tensor:
        p = torch.softmax(f, dim=-1)
        idx = torch.multinomial(p, m, replacement=True, generator=generator)  # (n, m)
        onehot = F.one_hot(idx, f.shape[-1]).to(f.dtype).transpose(1, 2)  # (n, C, m)
        return (p.unsqueeze(-1) - onehot) / math.sqrt(m)


class Gaussian(Likelihood):
    """Homoscedastic Gaussian ``y ~ N(f, σ² I)`` (mean squared error with noise ``σ``)."""

    name = "regression"

    def __init__(self, sigma: float = 1.0) -> None:
        if not sigma > 0:
            raise ValueError(f"sigma must be positive, got {sigma}.")
        self.sigma = float(sigma)

    def nll(self, f: Tensor, y: Tensor) -> Tensor:
        y = y.reshape(f.shape)
        return 0.5 * ((y - f) ** 2).sum() / self.sigma**2 + f.numel() * math.log(self.sigma * math.sqrt(2 * math.pi))

    def hessian_sqrt(self, f: Tensor, y: Tensor | None = None) -> Tensor:
        eye = torch.eye(f.shape[-1], dtype=f.dtype, device=f.device) / self.sigma
        return eye.expand(f.shape[0], -1, -1)

    def hessian_sqrt_diagonal(self, f: Tensor, y: Tensor | None = None) -> Tensor:
        return torch.full_like(f, 1.0 / self.sigma)

    def output_curvature_sum(self, f: Tensor, y: Tensor | None = None) -> Tensor:
        return torch.eye(f.shape[-1], dtype=f.dtype, device=f.device) * (f.shape[0] / self.sigma**2)

    def output_curvature_apply(self, f: Tensor, y: Tensor | None, v: Tensor) -> Tensor:
        return v / self.sigma**2

    def sampled_gradients(self, f: Tensor, m: int, generator: torch.Generator | None = None) -> Tensor:
        eps = torch.randn(*f.shape, m, dtype=f.dtype, device=f.device, generator=generator)
        # ŷ = f + σ ε  ⇒  ∇_f −log p(ŷ|f) = (f − ŷ)/σ² = −ε/σ
        return -eps / (self.sigma * math.sqrt(m))


class Bernoulli(Likelihood):
    """Independent Bernoulli outputs with sigmoid link; targets in {0, 1} of the same shape as ``f``."""

    name = "binary"

    def nll(self, f: Tensor, y: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(f, y.reshape(f.shape).to(f.dtype), reduction="sum")

    def hessian_sqrt(self, f: Tensor, y: Tensor | None = None) -> Tensor:
        return torch.diag_embed(self.hessian_sqrt_diagonal(f, y))

    def hessian_sqrt_diagonal(self, f: Tensor, y: Tensor | None = None) -> Tensor:
        p = torch.sigmoid(f)
        return (p * (1 - p)).sqrt()

    def output_curvature_sum(self, f: Tensor, y: Tensor | None = None) -> Tensor:
        p = torch.sigmoid(f)
        return torch.diag((p * (1 - p)).sum(0))

    def output_curvature_apply(self, f: Tensor, y: Tensor | None, v: Tensor) -> Tensor:
        p = torch.sigmoid(f)
        return p * (1 - p) * v

    def sampled_gradients(self, f: Tensor, m: int, generator: torch.Generator | None = None) -> Tensor:
        p = torch.sigmoid(f).unsqueeze(-1).expand(*f.shape, m)
        y = torch.bernoulli(p, generator=generator)
        return (p - y) / math.sqrt(m)


class BinaryMixture(Likelihood):
    """Mixture of two Bernoulli classifiers (thesis eq. 4.28), outputs ``f = (h1, h2, h3)``.

    ``q = p(y=1|f) = σ(h1) σ(h2) + (1 − σ(h1)) σ(h3)``. The negative log-likelihood is not convex in ``f``, so
    the Gauss-Newton splits the model at ``q`` (Definition 3.19 with ``z = q``): the Bernoulli loss is convex in
    ``q`` with second derivative ``y/q² + (1−y)/(1−q)²``, giving ``Λ(f, y) = (y/q² + (1−y)/(1−q)²) ∇q ∇qᵀ``,
    which depends on the observed target. The output Fisher averages over ``y ~ q`` instead:
    ``F = ∇q ∇qᵀ / (q (1 − q))``. The two differ, so KFAC (Fisher) and KFLR / KFRA (GGN) differ too.
    """

    name = "binary_mixture"
    target_free_curvature = False

    @staticmethod
    def _q_and_grad(f: Tensor) -> tuple[Tensor, Tensor]:
        if f.shape[-1] != 3:
            raise ValueError(f"BinaryMixture needs 3 outputs per example, got {f.shape[-1]}.")
        s = torch.sigmoid(f)
        s1, s2, s3 = s.unbind(-1)
        q = s1 * s2 + (1 - s1) * s3
        grad = torch.stack([s1 * (1 - s1) * (s2 - s3), s1 * s2 * (1 - s2), (1 - s1) * s3 * (1 - s3)], dim=-1)
        return q.clamp(1e-12, 1 - 1e-12), grad

    def nll(self, f: Tensor, y: Tensor) -> Tensor:
        q, _ = self._q_and_grad(f)
        y = y.reshape(q.shape).to(f.dtype)
        return -(y * q.log() + (1 - y) * (1 - q).log()).sum()

    def hessian_sqrt(self, f: Tensor, y: Tensor | None = None) -> Tensor:
        if y is None:
            raise ValueError("The mixture's Gauss-Newton depends on the targets; pass y.")
        q, grad = self._q_and_grad(f)
        y = y.reshape(q.shape).to(f.dtype)
        w = y / q**2 + (1 - y) / (1 - q) ** 2
        return (w.sqrt().unsqueeze(-1) * grad).unsqueeze(-1)

    def fisher_sqrt(self, f: Tensor) -> Tensor:
        q, grad = self._q_and_grad(f)
        return (grad / (q * (1 - q)).sqrt().unsqueeze(-1)).unsqueeze(-1)

    def sampled_gradients(self, f: Tensor, m: int, generator: torch.Generator | None = None) -> Tensor:
        q, grad = self._q_and_grad(f)
        y = torch.bernoulli(q.unsqueeze(-1).expand(*q.shape, m), generator=generator)
        # ∇_f −log p(ŷ|f) = −(ŷ/q − (1−ŷ)/(1−q)) ∇q
        coef = -(y / q.unsqueeze(-1) - (1 - y) / (1 - q).unsqueeze(-1))
        return grad.unsqueeze(-1) * coef.unsqueeze(-2) / math.sqrt(m)


LIKELIHOODS: dict[LikelihoodName, type[Likelihood]] = {
    LikelihoodName.classification: CrossEntropy,
    LikelihoodName.regression: Gaussian,
    LikelihoodName.binary: Bernoulli,
    LikelihoodName.binary_mixture: BinaryMixture,
}


def likelihood_from_name(name: str, **kwargs) -> Likelihood:
    """``"classification"`` → :class:`CrossEntropy`, ``"regression"`` → :class:`Gaussian`, ..."""
    try:
        cls = LIKELIHOODS[LikelihoodName(name)]
    except ValueError:
        raise ValueError(f"Unknown likelihood {name!r}; choose from {[n.value for n in LIKELIHOODS]}.") from None
    return cls(**kwargs)

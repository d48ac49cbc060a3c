"""Kronecker linear algebra: every identity the core uses, in one place.

A layer's precision is ``P = n·(G ⊗ A) + τ I`` acting on ``Ŵ`` flattened row-major (docs/design.md §3). With
``G = U_G diag(s_G) U_Gᵀ`` and ``A = U_A diag(s_A) U_Aᵀ``:

* ``(G ⊗ A) vec(V) = vec(G V A)``;
* ``P`` has eigenvectors ``U_G ⊗ U_A`` and eigenvalues ``n s_G s_Aᵀ + τ`` (an out × in matrix ``Λ``), so
  ``P⁻¹ vec(V) = vec(U_G [(U_Gᵀ V U_A) ⊘ Λ] U_Aᵀ)`` and ``log det P = Σ log Λ``;
* a sample from ``N(0, P⁻¹)`` is ``U_G (Z ⊘ √Λ) U_Aᵀ`` with ``Z`` standard normal.

The factored alternative (thesis eq. 4.25 and 5.14) replaces ``P`` by
``(√n G + ω√τ I) ⊗ (√n A + ω⁻¹√τ I)``, with ``ω = 1`` (eq. 5.14) or the trace-norm choice of eq. 4.27.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def kron_matvec(G: Tensor, A: Tensor, V: Tensor) -> Tensor:
    """``(G ⊗ A) vec(V)`` as a matrix: ``G V Aᵀ``. ``V`` may carry leading batch dimensions."""
    return G @ V @ A.transpose(-1, -2)


def sym_eigh(
    M: Tensor, min_eig: float = 0.0, compute_dtype: torch.dtype | None = torch.float64
) -> tuple[Tensor, Tensor]:
    """Eigendecomposition of a symmetric positive semi-definite matrix, eigenvalues clamped at ``min_eig``.

    The matrix is symmetrised first; the decomposition runs in ``compute_dtype`` (float64 by default; ``None``:
    the matrix's own dtype, about twice as fast for float32 factors) and is cast back.
    """
    if M.dim() != 2 or M.shape[0] != M.shape[1]:
        raise ValueError(f"Expected a square matrix, got shape {tuple(M.shape)}.")
    dtype = M.dtype
    m = M.to(compute_dtype or dtype)
    try:
        s, u = torch.linalg.eigh(0.5 * (m + m.T))
    except torch.linalg.LinAlgError:
        if m.dtype == torch.float64:
            raise
        # Single-precision LAPACK can fail to converge on factors with many equal (e.g. zero) eigenvalues.
        m = M.to(torch.float64)
        s, u = torch.linalg.eigh(0.5 * (m + m.T))
    return s.clamp_min(min_eig).to(dtype), u.to(dtype)


@dataclass
class KronEigen:
    """Eigendecompositions of one layer's factors."""

    s_G: Tensor
    U_G: Tensor
    s_A: Tensor
    U_A: Tensor

    @classmethod
    def from_factors(cls, G: Tensor, A: Tensor, compute_dtype: torch.dtype | None = torch.float64) -> KronEigen:
        """Eigendecompose both factors (see :func:`sym_eigh`); eigenvectors are stored row-major (contiguous).

        A stored layout matters: matmuls round differently on column- and row-major operands, so one layout
        keeps a saved and reloaded eigenbasis bit-identical to the fresh one.
        """
        s_g, u_g = sym_eigh(G, compute_dtype=compute_dtype)
        s_a, u_a = sym_eigh(A, compute_dtype=compute_dtype)
        return cls(s_g, u_g.contiguous(), s_a, u_a.contiguous())

    def eigenvalues(self, n_eff: float | Tensor, prior_precision: float | Tensor) -> Tensor:
        """The (out, in+1) matrix ``n s_G s_Aᵀ + τ`` of the precision's eigenvalues.

        ``prior_precision`` may be a scalar or a tensor broadcastable to (out, in+1) in the eigenbasis.
        """
        return n_eff * torch.outer(self.s_G, self.s_A) + prior_precision

    def factored(self, n_eff: float, prior_precision: float | Tensor, omega: float = 1.0) -> FactoredPrecision:
        """The factored precision ``(√n G + ω√τ I) ⊗ (√n A + ω⁻¹√τ I)`` (eq. 5.14 / 4.25) in this eigenbasis.

        Adding a multiple of the identity keeps a factor's eigenvectors, so no second decomposition is needed:
        the damped factors have eigenvalues ``√n s_G + ω√τ`` and ``√n s_A + √τ/ω``.
        """
        if isinstance(prior_precision, Tensor) and prior_precision.numel() > 1:
            raise ValueError("Factored damping needs a scalar prior precision per layer.")
        rn = math.sqrt(n_eff)
        rt = torch.as_tensor(prior_precision, dtype=self.s_G.dtype).sqrt()
        return FactoredPrecision(rn * self.s_G + omega * rt, self.U_G, rn * self.s_A + rt / omega, self.U_A)

    def to_eigenbasis(self, V: Tensor) -> Tensor:
        return self.U_G.transpose(-1, -2) @ V @ self.U_A

    def from_eigenbasis(self, V: Tensor, out: Tensor | None = None) -> Tensor:
        """``U_G V U_Aᵀ``, written to ``out`` when given."""
        return torch.matmul(self.U_G @ V, self.U_A.transpose(-1, -2), out=out)

    def damped_inverse_apply(self, V: Tensor, n_eff, prior_precision) -> Tensor:
        """``(n G ⊗ A + τ I)⁻¹ vec(V)``, exactly, for V shaped (..., out, in+1)."""
        return self.from_eigenbasis(self.to_eigenbasis(V) / self.eigenvalues(n_eff, prior_precision))

    def damped_apply(self, V: Tensor, n_eff, prior_precision) -> Tensor:
        """``(n G ⊗ A + τ I) vec(V)``."""
        return self.from_eigenbasis(self.to_eigenbasis(V) * self.eigenvalues(n_eff, prior_precision))

    def logdet(self, n_eff, prior_precision) -> Tensor:
        """``log det (n G ⊗ A + τ I)``."""
        return self.eigenvalues(n_eff, prior_precision).log().sum()

    def sample(self, z: Tensor, n_eff, prior_precision) -> Tensor:
        """Map standard normals ``z`` (..., out, in+1) to draws from ``N(0, (n G ⊗ A + τ I)⁻¹)``."""
        return self.from_eigenbasis(z / self.eigenvalues(n_eff, prior_precision).sqrt())


def trace_norm_omega(G: Tensor, A: Tensor) -> float:
    """``ω* = √(‖G ⊗ I‖_* / ‖I ⊗ A‖_*) = √((tr G / dim G) / (tr A / dim A))`` (thesis eq. 4.27)."""
    tg = torch.trace(G).item() / G.shape[0]
    ta = torch.trace(A).item() / A.shape[0]
    if tg <= 0 or ta <= 0:
        return 1.0
    return math.sqrt(tg / ta)


def factored_damping(G: Tensor, A: Tensor, n_eff: float, prior_precision: float, omega: float = 1.0):
    """The damped factors ``(√n G + ω√τ I, √n A + ω⁻¹√τ I)`` of eq. 4.25 / 5.14.

    Their Kronecker product approximates ``n G ⊗ A + τ I`` (exact when ``τ = 0``).
    """
    if prior_precision < 0 or n_eff < 0:
        raise ValueError("n_eff and prior_precision must be non-negative.")
    if omega <= 0:
        raise ValueError(f"omega must be positive, got {omega}.")
    rn, rt = math.sqrt(n_eff), math.sqrt(prior_precision)
    eye_g = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    eye_a = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    return rn * G + omega * rt * eye_g, rn * A + (rt / omega) * eye_a


@dataclass
class FactoredPrecision:
    """A precision ``P_G ⊗ P_A`` with both factors positive definite, stored by eigendecomposition."""

    s_G: Tensor
    U_G: Tensor
    s_A: Tensor
    U_A: Tensor

    @classmethod
    def from_factors(cls, G: Tensor, A: Tensor, n_eff: float, prior_precision: float, omega: float = 1.0):
        pg, pa = factored_damping(G, A, n_eff, prior_precision, omega)
        s_g, u_g = sym_eigh(pg, min_eig=torch.finfo(G.dtype).tiny)
        s_a, u_a = sym_eigh(pa, min_eig=torch.finfo(A.dtype).tiny)
        return cls(s_g, u_g, s_a, u_a)

    def eigenvalues(self) -> Tensor:
        return torch.outer(self.s_G, self.s_A)

    def inverse_apply(self, V: Tensor) -> Tensor:
        """``(P_G ⊗ P_A)⁻¹ vec(V) = P_G⁻¹ V P_A⁻¹``."""
        inner = (self.U_G.transpose(-1, -2) @ V @ self.U_A) / self.eigenvalues()
        return self.U_G @ inner @ self.U_A.transpose(-1, -2)

    def logdet(self) -> Tensor:
        return self.s_A.numel() * self.s_G.log().sum() + self.s_G.numel() * self.s_A.log().sum()

    def sample(self, z: Tensor) -> Tensor:
        """Matrix-normal draw ``L_G Z L_Aᵀ`` (``L L ᵀ`` the inverse factors) for z (..., out, in+1)."""
        lg = self.U_G / self.s_G.sqrt()
        la = self.U_A / self.s_A.sqrt()
        return lg @ z @ la.transpose(-1, -2)

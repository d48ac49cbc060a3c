"""The linearised logit covariance as a function of one number, for tuning.

With exact damping and one prior precision ``τ`` for every layer, each layer's precision is ``N_eff Λ + τ`` in its
eigenbasis, so the logit covariance of the linearised network is

    ``Σ(N_eff, τ) = (1/τ) Σ_l Σ_k φ_k φ_kᵀ / (1 + s λ_k)``,   ``s = N_eff / τ``,

over the eigen-directions ``k`` of every layer (``φ_k`` the validation features, ``λ_k`` the curvature
eigenvalues). Candidates that share ``s`` share the sum: it is computed once per ``s``, and a candidate's ``τ``
only rescales it. Directions the training data never excited (:attr:`~curvature.posterior.LayerPosterior.
null_columns`) are kept apart, as a second sum in ``s₀ = N_eff / τ₀``, so that a null-space prior ``τ₀`` is a
second rescaling.

For a Kronecker layer applied once per example the sum over ``k = (o, i)`` is
``Σ_o (g_o g_oᵀ) Σ_i a_i² / (1 + s λ^G_o λ^A_i)`` and costs ``B · out · in`` per ``s``. With ``interpolate``
the weight ``1 / (1 + s λ^G λ^A)`` is interpolated linearly in ``(log λ^G, log λ^A)`` between log-spaced nodes
(``nodes_per_decade`` per decade of each spectrum): the features are folded onto the nodes once, after which a
value of ``s`` costs ``B · M_G · (M_A + C²)`` for ``M`` nodes, independent of the layer's width. The weight is
smooth in the logarithms (its second derivative there is at most 0.1), so with 8 nodes per decade every entry of
the sum is within about 1 % of the exact one. Other layers (convolutions, diagonal curvature) are summed
exactly, once per ``s``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .predictive import GLMFeatures

#: Spectra are clamped to this fraction of their largest value before their logarithm is taken.
_FLOOR = 1e-14
#: Elements of the outer products ``g gᵀ`` per chunk of output units while folding them.
_CHUNK = 1 << 22
#: The most elements a layer's folded ``g gᵀ`` (B, nodes, C, C) may hold; larger layers are summed exactly.
_FOLDED_MAX = 1 << 26


def _log_nodes(values: Tensor, per_decade: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Log-spaced nodes spanning ``values`` and each value's two linear-interpolation neighbours and weights."""
    v = values.double().clamp_min(0)
    top = float(v.max()) if v.numel() else 0.0
    if top <= 0:
        nodes = torch.zeros(1, dtype=torch.float64, device=v.device)
        idx = torch.zeros(len(v), dtype=torch.long, device=v.device)
        return nodes, idx, idx, torch.ones_like(v)
    u = v.clamp_min(top * _FLOOR).log()
    lo, hi = float(u.min()), float(u.max())
    count = max(2, math.ceil((hi - lo) / math.log(10) * per_decade) + 1)
    step = max((hi - lo) / (count - 1), 1e-12)
    nodes = torch.exp(lo + step * torch.arange(count, dtype=torch.float64, device=v.device))
    pos = ((u - lo) / step).clamp(0, count - 1)
    i0 = pos.floor().long().clamp_max(count - 2)
    w1 = pos - i0
    return nodes, i0, i0 + 1, w1


class _InterpolatedKron:
    """``Σ_o g_o g_oᵀ Σ_i a_i² / (1 + s λ^G_o λ^A_i)`` over a subset of input columns, interpolated."""

    def __init__(self, g: Tensor, a2: Tensor, s_g: Tensor, s_a: Tensor, per_decade: int) -> None:
        dtype = g.dtype
        mu, g0, g1, gw = _log_nodes(s_g, per_decade)
        nu, a0, a1, aw = _log_nodes(s_a, per_decade)
        b = a2.shape[0]
        c = g.shape[0]
        a2d = a2.double()
        folded_a = a2d.new_zeros(b, len(nu))
        folded_a.index_add_(1, a0, a2d * (1 - aw))
        folded_a.index_add_(1, a1, a2d * aw)
        gb = g.permute(1, 2, 0)  # (B, out, C)
        folded_g = g.new_zeros(b, len(mu), c, c)
        chunk = max(1, _CHUNK // max(1, b * c * c))
        for lo in range(0, gb.shape[1], chunk):
            part = gb[:, lo : lo + chunk]
            outer = part.unsqueeze(-1) * part.unsqueeze(-2)  # (B, k, C, C)
            w = gw[lo : lo + chunk].to(dtype)
            folded_g.index_add_(1, g0[lo : lo + chunk], outer * (1 - w).view(1, -1, 1, 1))
            folded_g.index_add_(1, g1[lo : lo + chunk], outer * w.view(1, -1, 1, 1))
        self.mu, self.nu = mu, nu
        self.folded_a = folded_a.to(dtype)
        self.folded_g = folded_g
        self.trace = folded_g.diagonal(dim1=-2, dim2=-1).sum(-1)  # (B, M_G)

    def __call__(self, s: float) -> Tensor:
        weight = (1.0 / (1.0 + s * torch.outer(self.mu, self.nu))).to(self.folded_a.dtype)  # (M_G, M_A)
        m = self.folded_a @ weight.T  # (B, M_G)
        return torch.einsum("bj,bjcd->bcd", m, self.folded_g)


class _ExactLayer:
    """``Σ_k φ_k φ_kᵀ / (1 + s λ_k)`` over the eigen-directions of the selected columns, computed exactly."""

    def __init__(self, g: Tensor, a2: Tensor | None, lam: Tensor, columns: Tensor) -> None:
        self.g, self.a2 = g, a2
        self.lam = lam.clamp_min(0)
        self.mask = columns.to(lam.dtype).expand_as(lam)

    def __call__(self, s: float) -> Tensor:
        inv = self.mask / (1.0 + s * self.lam)
        if self.a2 is not None:
            gb = self.g.transpose(0, 1)  # (B, C, out)
            m = self.a2 @ inv.T  # (B, out)
            return (gb * m.unsqueeze(1)) @ gb.transpose(-1, -2)
        flat = self.g.flatten(2)
        return (flat * inv.reshape(1, 1, -1)) @ flat.transpose(-1, -2)


class SpectralCovariance:
    """``U(s) = Σ_k φ_k φ_kᵀ / (1 + s λ_k)`` on the features of some inputs, so that ``Σ(N_eff, τ) = U(N_eff/τ)/τ``.

    Args:
        post: a :class:`~curvature.posterior.LaplacePosterior` with exact damping.
        feats: the inputs' :class:`~curvature.predictive.GLMFeatures`.
        split_null: keep never-excited directions in a second sum (:meth:`null`), for a null-space prior.
        interpolate: interpolate Kronecker layers (see the module docstring); exact otherwise.
        nodes_per_decade: interpolation nodes per decade of each Kronecker spectrum.
    """

    def __init__(
        self,
        post,
        feats: GLMFeatures,
        split_null: bool = False,
        interpolate: bool = True,
        nodes_per_decade: int = 8,
    ) -> None:
        if post.damping != "exact":
            raise ValueError("The spectral covariance needs exact damping (factored damping does not scale).")
        self.f = feats.f
        self._main: list = []
        self._null: list = []
        b, c = feats.f.shape
        for name, (g, a2) in feats.rotated.items():
            block = post.blocks[name]
            null = block.null_columns if split_null else None
            if null is not None and not bool(null.any()):
                null = None
            kron = a2 is not None and getattr(block, "kind", "") == "kron"
            small_enough = kron and b * c * c * len(_log_nodes(block.s_G, nodes_per_decade)[0]) <= _FOLDED_MAX
            for cols, target in ((None if null is None else ~null, self._main), (null, self._null)):
                if target is self._null and null is None:
                    continue
                if kron and interpolate and small_enough:
                    s_a = block.s_A if cols is None else block.s_A[cols]
                    a_part = a2 if cols is None else a2[:, cols]
                    target.append(_InterpolatedKron(g, a_part, block.s_G, s_a, nodes_per_decade))
                else:
                    lam = block.eigenvalues(1.0, 0.0, "exact")
                    columns = torch.ones(lam.shape[-1], dtype=torch.bool, device=lam.device) if cols is None else cols
                    target.append(_ExactLayer(g, a2, lam, columns))
        self._cache: dict[tuple[str, float], Tensor] = {}

    @property
    def has_null(self) -> bool:
        return bool(self._null)

    def _sum(self, parts: list, key: str, s: float) -> Tensor:
        k = (key, float(s))
        if k not in self._cache:
            out = self.f.new_zeros(self.f.shape[0], self.f.shape[1], self.f.shape[1])
            for part in parts:
                out = out + part(s)
            self._cache[k] = out
        return self._cache[k]

    def main(self, s: float) -> Tensor:
        """``U(s)`` over the excited directions (all of them when the null space is not split)."""
        return self._sum(self._main, "main", s)

    def null(self, s: float) -> Tensor:
        """``U(s)`` over the never-excited directions (zeros when there are none)."""
        return self._sum(self._null, "null", s)

    def covariance(self, n_eff: float, tau: float, tau0: float | None = None) -> Tensor:
        """``Σ(N_eff, τ)`` with ``τ₀`` on never-excited directions (``None``: ``τ`` there too)."""
        cov = self.main(n_eff / tau) / tau
        if self._null:
            t0 = tau if tau0 is None else tau0
            cov = cov + self.null(n_eff / t0) / t0
        return cov

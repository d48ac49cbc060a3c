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
smooth in the logarithms (its second derivative there is at most 0.1), so with 6 nodes per decade every entry of
the sum is within about 1 % of the exact one, at any ``s``: no eigenvalue is clamped (zero ones have a node of
their own), since at large ``s`` even the smallest decide whether a direction keeps its prior variance.

Layers whose features are full per-direction Jacobians (convolutions) fold their outer products onto nodes of
``log λ`` alone, so a value of ``s`` costs ``B · M · C²`` there too. Layers applied once per example with diagonal
curvature (whose ``λ`` has no Kronecker structure) are summed exactly, once per ``s``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .predictive import GLMFeatures, layer_covariance

#: The most elements a layer's folded ``g gᵀ`` (B, nodes, C, C) may hold; larger layers are summed exactly.
_FOLDED_MAX = 1 << 26


#: Decades below the largest eigenvalue interpolated at the full node density; below them one node per decade.
_DENSE_DECADES = 12


def _log_nodes(values: Tensor, per_decade: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Nodes for interpolating in ``log λ``, and each value's two neighbouring nodes and its weight on the upper.

    Node 0 is ``λ = 0`` (weight ``1`` at any ``s``), where zero (or negative round-off) eigenvalues go; positive
    values are interpolated between log-spaced nodes from the smallest positive value to the largest,
    ``per_decade`` per decade over the top :data:`_DENSE_DECADES` decades and one per decade below. No value is
    clamped: at large ``s`` even eigenvalues ~1e-20 of the largest decide whether a direction keeps its prior
    variance.
    """
    v = values.double()
    positive = v > 0
    if not bool(positive.any()):
        zero = torch.zeros(len(v), dtype=torch.long, device=v.device)
        return torch.zeros(2, dtype=torch.float64, device=v.device), zero, zero + 1, torch.zeros_like(v)
    u = v.clamp_min(float(v[positive].min())).log()
    lo, hi = float(u[positive].min()), float(u.max())
    decade = math.log(10)
    split = max(lo, hi - _DENSE_DECADES * decade)
    dense = torch.linspace(split, hi, max(2, math.ceil((hi - split) / decade * per_decade) + 1), dtype=torch.float64)
    sparse = torch.linspace(lo, split, max(2, math.ceil((split - lo) / decade) + 1), dtype=torch.float64)[:-1]
    log_nodes = torch.cat([sparse, dense]).to(v.device)
    if len(log_nodes) < 2 or float(log_nodes[-1] - log_nodes[0]) <= 0:
        log_nodes = torch.tensor([lo, lo + 1e-12], dtype=torch.float64, device=v.device)
    i0 = (torch.searchsorted(log_nodes, u.contiguous(), right=True) - 1).clamp(0, len(log_nodes) - 2)
    left, right = log_nodes[i0], log_nodes[i0 + 1]
    w1 = ((u - left) / (right - left)).clamp(0, 1)
    nodes = torch.cat([torch.zeros(1, dtype=torch.float64, device=v.device), log_nodes.exp()])
    # node 0 is λ = 0: zeros put all their weight there
    i0 = torch.where(positive, i0 + 1, torch.zeros_like(i0))
    w1 = torch.where(positive, w1, torch.zeros_like(w1))
    return nodes, i0, i0 + 1, w1


def _fold_outer(cols: Tensor, lower: Tensor, weight: Tensor, nodes: int) -> Tensor:
    """``Σ_k w_{k,j} x_k x_kᵀ`` per node ``j`` for the columns ``x_k`` of ``cols`` (B, C, K): the upper triangles.

    Column ``k`` adds ``(1 − w_k) x_k x_kᵀ`` to node ``lower[k]`` and ``w_k x_k x_kᵀ`` to the next one; with the
    columns grouped by node, each node is two batched products (B, C, n) @ (B, n, C). Returns (B, nodes, T).
    """
    b, c, _ = cols.shape
    order = torch.argsort(lower)
    ends = torch.bincount(lower, minlength=nodes).cumsum(0).tolist()
    grouped = cols[:, :, order]
    low = grouped * (1 - weight[order]).sqrt().to(cols.dtype)
    high = grouped * weight[order].sqrt().to(cols.dtype)
    folded = cols.new_zeros(b, nodes, c, c)
    start = 0
    for j, end in enumerate(ends):
        if end > start:
            x0, x1 = low[:, :, start:end], high[:, :, start:end]
            folded[:, j] += torch.bmm(x0, x0.transpose(1, 2))
            folded[:, j + 1] += torch.bmm(x1, x1.transpose(1, 2))
        start = end
    iu = torch.triu_indices(c, c, device=cols.device)
    return folded[:, :, iu[0], iu[1]].contiguous()


class _Symmetric:
    """Upper triangles (B, T) back to symmetric (B, C, C) matrices, as one product."""

    def __init__(self, c: int, like: Tensor) -> None:
        iu = torch.triu_indices(c, c, device=like.device)
        tri = iu.shape[1]
        self.unpack = like.new_zeros(tri, c * c)
        rows = torch.arange(tri, device=like.device)
        self.unpack[rows, iu[0] * c + iu[1]] = 1
        self.unpack[rows, iu[1] * c + iu[0]] = 1
        self.c = c

    def __call__(self, flat: Tensor) -> Tensor:
        return (flat @ self.unpack).view(-1, self.c, self.c)


class _InterpolatedKron:
    """``Σ_o g_o g_oᵀ Σ_i a_i² w_i / (1 + s_i λ^G_o λ^A_i)`` of one Kronecker layer, interpolated.

    ``s_i = s`` and ``w_i = 1`` on excited input columns; on never-excited ones (``null``) ``s_i = s₀`` and
    ``w_i = ρ``. Both column sets share the fold of ``g gᵀ`` onto the ``λ^G`` nodes, so a call costs one batched
    matrix-vector product with it.
    """

    def __init__(self, g: Tensor, a2: Tensor, s_g: Tensor, s_a: Tensor, null: Tensor | None, per_decade: int) -> None:
        dtype = g.dtype
        mu, g0, _, gw = _log_nodes(s_g, per_decade)
        b, c = a2.shape[0], g.shape[0]
        self.parts = []
        for cols in [None] if null is None else [~null, null]:
            if cols is not None and not bool(cols.any()):
                continue
            sa = s_a if cols is None else s_a[cols]
            nu, a0, a1, aw = _log_nodes(sa, per_decade)
            # fold onto the nodes with the node index leading, so each scatter adds whole contiguous rows
            a2t = (a2 if cols is None else a2[:, cols]).double().T  # (in, B)
            folded = a2t.new_zeros(len(nu), b)
            folded.index_add_(0, a0, a2t * (1 - aw).unsqueeze(1))
            folded.index_add_(0, a1, a2t * aw.unsqueeze(1))
            self.parts.append((cols is not None and cols is null, nu, folded.T.to(dtype).contiguous()))  # (B, M_A)
        self.mu = mu
        self.folded_g = _fold_outer(g.permute(1, 0, 2), g0, gw, len(mu))  # (B, M_G, T)
        self.symmetric = _Symmetric(c, g)

    def __call__(self, s: float, s0: float, rho: float) -> Tensor:
        m = self.folded_g.new_zeros(self.folded_g.shape[0], self.folded_g.shape[1])
        for is_null, nu, folded_a in self.parts:
            scale, weight = (s0, rho) if is_null else (s, 1.0)
            h = (weight / (1.0 + scale * torch.outer(self.mu, nu))).to(folded_a.dtype)  # (M_G, M_A)
            m = m + folded_a @ h.T  # (B, M_G)
        return self.symmetric(torch.bmm(m.unsqueeze(1), self.folded_g).squeeze(1))


class _InterpolatedFlat:
    """``Σ_k j_k j_kᵀ w_k / (1 + s_k λ_k)`` over a layer's flattened eigen-directions, interpolated in ``log λ``.

    For layers whose features are full per-direction Jacobians (convolutions: ``J̃`` (B, C, out, in)), where the
    weight depends on ``λ_k`` alone: the outer products are folded once onto nodes of ``log λ`` (excited and
    never-excited directions apart), after which a call is one product (B, M, T) × (M,) per part.
    """

    def __init__(self, g: Tensor, lam: Tensor, null: Tensor | None, per_decade: int) -> None:
        c = g.shape[1]
        flat = g.flatten(2)  # (B, C, P)
        lam = lam.reshape(-1)
        self.parts = []
        mask = None if null is None else null.expand(g.shape[2], -1).reshape(-1)
        for cols in [None] if mask is None else [~mask, mask]:
            if cols is not None and not bool(cols.any()):
                continue
            nodes, i0, _, w = _log_nodes(lam if cols is None else lam[cols], per_decade)
            folded = _fold_outer(flat if cols is None else flat[:, :, cols], i0, w, len(nodes))
            self.parts.append((cols is not None and cols is mask, nodes, folded))
        self.symmetric = _Symmetric(c, g)

    def __call__(self, s: float, s0: float, rho: float) -> Tensor:
        total = None
        for is_null, nodes, folded in self.parts:
            scale, weight = (s0, rho) if is_null else (s, 1.0)
            h = (weight / (1.0 + scale * nodes)).to(folded.dtype)  # (M,)
            term = torch.einsum("bmt,m->bt", folded, h)
            total = term if total is None else total + term
        return self.symmetric(total)


class _ExactLayer:
    """The same sum for any layer, computed exactly (diagonal curvature; any layer when not interpolating)."""

    def __init__(self, g: Tensor, a2: Tensor | None, lam: Tensor, null: Tensor | None) -> None:
        self.g, self.a2 = g, a2
        self.lam = lam.clamp_min(0)
        self.null = None if null is None else null.to(lam.dtype).expand_as(lam)

    def __call__(self, s: float, s0: float, rho: float) -> Tensor:
        if self.null is None:
            weight = 1.0 / (1.0 + s * self.lam)
        else:
            weight = (1 - self.null) / (1.0 + s * self.lam) + self.null * (rho / (1.0 + s0 * self.lam))
        return layer_covariance(self.g, self.a2, weight)


class SpectralCovariance:
    """``U(s, s₀, ρ) = Σ_k φ_k φ_kᵀ w_k / (1 + s_k λ_k)`` on the features of some inputs, so that
    ``Σ(N_eff, τ, τ₀) = U(N_eff/τ, N_eff/τ₀, τ/τ₀) / τ`` (``s_k, w_k`` are ``s, 1`` on excited directions and
    ``s₀, ρ`` on never-excited ones).

    Args:
        post: a :class:`~curvature.posterior.LaplacePosterior` with exact damping.
        feats: the inputs' :class:`~curvature.predictive.GLMFeatures`.
        split_null: give never-excited directions their own prior ``τ₀`` (otherwise ``τ₀`` is ignored).
        interpolate: interpolate Kronecker layers and convolutions (see the module docstring); exact otherwise.
        nodes_per_decade: interpolation nodes per decade of each Kronecker spectrum.
    """

    def __init__(
        self,
        post,
        feats: GLMFeatures,
        split_null: bool = False,
        interpolate: bool = True,
        nodes_per_decade: int = 6,
    ) -> None:
        if post.damping != "exact":
            raise ValueError("The spectral covariance needs exact damping (factored damping does not scale).")
        self.f = feats.f
        self._layers: list = []
        self.has_null = False
        b, c = feats.f.shape
        for name, (g, a2) in feats.rotated.items():
            block = post.blocks[name]
            null = block.null_columns if split_null else None
            if null is not None and not bool(null.any()):
                null = None
            self.has_null = self.has_null or null is not None
            kron = a2 is not None and getattr(block, "kind", "") == "kron"
            lam = block.eigenvalues(1.0, 0.0, "exact")
            if interpolate and kron and b * c * c * len(_log_nodes(block.s_G, nodes_per_decade)[0]) <= _FOLDED_MAX:
                self._layers.append(_InterpolatedKron(g, a2, block.s_G, block.s_A, null, nodes_per_decade))
            elif (
                interpolate
                and a2 is None
                and b * c * c * len(_log_nodes(lam.reshape(-1), nodes_per_decade)[0]) <= _FOLDED_MAX
            ):
                self._layers.append(_InterpolatedFlat(g, lam, null, nodes_per_decade))
            else:
                self._layers.append(_ExactLayer(g, a2, lam, null))
        self._cache: dict[float, Tensor] = {}

    def _sum(self, s: float, s0: float, rho: float) -> Tensor:
        out = self.f.new_zeros(self.f.shape[0], self.f.shape[1], self.f.shape[1])
        for layer in self._layers:
            out = out + layer(s, s0, rho)
        return out

    def covariance(self, n_eff: float, tau: float, tau0: float | None = None) -> Tensor:
        """``Σ(N_eff, τ)`` with ``τ₀`` on never-excited directions (``None``: ``τ`` there too)."""
        s = n_eff / tau
        if tau0 is None or not self.has_null:
            if s not in self._cache:  # candidates sharing N_eff/τ share the sum
                self._cache[s] = self._sum(s, s, 1.0)
            return self._cache[s] / tau
        return self._sum(s, n_eff / tau0, tau / tau0) / tau

"""Cross-check of our Kronecker factors against BackPACK, an independent implementation.

BackPACK (``backpack.extensions.KFLR`` / ``KFRA`` / ``KFAC``) stores, per Linear layer, ``weight.<ext> =
[G, A_w]`` and ``bias.<ext> = [G]``, where ``A_w = E[a aᵀ]`` has no bias row and, with a ``reduction="mean"``
loss, ``G`` is already a data average. Our layer block is ``N·(G ⊗ A)`` with ``â = [a; 1]``, so the shared
blocks map as ``A[:-1, :-1] ↔ A_w``, ``G ↔ G`` and the bias block ``G·A[-1, -1] = G ↔ G``. The weight-bias
cross block ``A[:-1, -1] = E[a]`` has no BackPACK counterpart. KFLR and KFRA are deterministic and must agree
to float64 round-off; KFAC is compared across two independent many-sample Monte-Carlo estimates.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

import curvature as cv

backpack = pytest.importorskip("backpack")
from backpack import extensions as bp_ext  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")

N_DATA = 7
EXACT_RTOL = 1e-8
KFAC_SAMPLES = 20_000
KFAC_RTOL = 0.05


@dataclass(frozen=True)
class Case:
    name: str
    widths: tuple[int, ...]
    activations: tuple[type[nn.Module], ...]
    seed: int


CASES = [
    Case("5-4-3-tanh", (5, 4, 3), (nn.Tanh,), 0),
    Case("5-4-3-relu", (5, 4, 3), (nn.ReLU,), 1),
    Case("5-4-4-3-tanh-relu", (5, 4, 4, 3), (nn.Tanh, nn.ReLU), 2),
]


def make_problem(case: Case) -> tuple[nn.Sequential, Tensor, Tensor]:
    """A float64 MLP with the case's widths and activations, inputs and class labels (``N_DATA`` points)."""
    generator = torch.Generator().manual_seed(case.seed)
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(case.widths[:-1], case.widths[1:], strict=True)):
        if i:
            layers.append(case.activations[i - 1]())
        linear = nn.Linear(fan_in, fan_out).double()
        with torch.no_grad():
            linear.weight.copy_(torch.randn(fan_out, fan_in, generator=generator, dtype=torch.float64))
            linear.bias.copy_(0.5 * torch.randn(fan_out, generator=generator, dtype=torch.float64))
        layers.append(linear)
    x = torch.randn(N_DATA, case.widths[0], generator=generator, dtype=torch.float64)
    y = torch.randint(0, case.widths[-1], (N_DATA,), generator=generator)
    return nn.Sequential(*layers), x, y


def backpack_factors(model: nn.Module, x: Tensor, y: Tensor, extension) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
    """BackPACK's ``(G_weight, A_weight, G_bias)`` per Linear layer, on a copy of ``model``."""
    model = backpack.extend(copy.deepcopy(model))
    loss_fn = backpack.extend(nn.CrossEntropyLoss(reduction="mean"))
    loss = loss_fn(model(x), y)
    with backpack.backpack(extension):
        loss.backward()
    attr = type(extension).__name__.lower()
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            g_w, a_w = getattr(module.weight, attr)
            (g_b,) = getattr(module.bias, attr)
            out[name] = (g_w.detach(), a_w.detach(), g_b.detach())
    return out


def rel_diff(ours: Tensor, theirs: Tensor) -> float:
    return float((ours - theirs).norm() / theirs.norm())


def report(name: str, what: str, ours: Tensor, theirs: Tensor) -> str:
    return f"layer {name}, {what}: rel diff {rel_diff(ours, theirs):.3e}\nours\n{ours}\nBackPACK\n{theirs}"


def assert_factors_agree(ours: cv.KroneckerFactors, theirs: dict, g_rtol: float) -> None:
    assert list(ours) == list(theirs), f"layer names differ: {list(ours)} vs {list(theirs)}"
    assert ours.n_data == N_DATA
    for name, (g_w, a_w, g_b) in theirs.items():
        A, G = ours[name].A, ours[name].G
        assert A.dtype == G.dtype == torch.float64
        assert A.shape == (a_w.shape[0] + 1, a_w.shape[0] + 1) and G.shape == g_w.shape
        assert rel_diff(A[:-1, :-1], a_w) <= EXACT_RTOL, report(name, "A (weight block)", A[:-1, :-1], a_w)
        assert rel_diff(G, g_w) <= g_rtol, report(name, "G (weight block)", G, g_w)
        assert rel_diff(G * A[-1, -1], g_b) <= g_rtol, report(name, "G (bias block)", G * A[-1, -1], g_b)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("method", ["kflr", "kfra"])
def test_exact_factors_match_backpack(case: Case, method: str) -> None:
    model, x, y = make_problem(case)
    ours = cv.fit_kronecker(model, (x, y), cv.CrossEntropy(), method=method)
    extension = bp_ext.KFLR() if method == "kflr" else bp_ext.KFRA()
    assert_factors_agree(ours, backpack_factors(model, x, y, extension), EXACT_RTOL)


@pytest.mark.montecarlo
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_kfac_matches_backpack_in_expectation(case: Case) -> None:
    model, x, y = make_problem(case)
    generator = torch.Generator().manual_seed(1234 + case.seed)
    ours = cv.fit_kronecker(
        model, (x, y), cv.CrossEntropy(), method="kfac", mc_samples=KFAC_SAMPLES, generator=generator
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4321 + case.seed)
        theirs = backpack_factors(model, x, y, bp_ext.KFAC(mc_samples=KFAC_SAMPLES))
    assert_factors_agree(ours, theirs, KFAC_RTOL)

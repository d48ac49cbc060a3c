"""Install the rival libraries the benchmarks compare against, into the running interpreter.

Usage: ``python bench/install_rivals.py [--force] [--backpack-only | --kfac-jax]`` (``make bench-deps``);
``--backpack-only`` installs just the BackPACK pins the test suite's cross-check needs; ``--kfac-jax`` installs
only kfac-jax and the jax it runs on (``make bench-optim``), never touching torch.

laplace-torch and BackPACK declare ``torchvision`` as a requirement, but neither needs it for what the
benchmarks use, and the registry's torchvision does not import beside our torch build. So every package is
installed with ``--no-deps`` from an explicit, pinned dependency closure, and ``torch`` is pinned on every pip
command line so that nothing can pull a different (CUDA) build. The script is idempotent: when every pin is
already installed and the smoke test (import ``laplace`` and fit a tiny Kronecker Laplace with both backends the
benchmarks use) passes, it does nothing.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import subprocess
import sys

TORCH_PIN = "torch==2.13.0"

# Rival-only packages: exact pins, installed with --no-deps. Together they are laplace-torch's dependency
# closure minus torchvision (and minus what the project itself already requires, listed below).
LAPLACE_TORCH = "laplace-torch==0.3"
RIVAL_PINS: tuple[str, ...] = (
    LAPLACE_TORCH,
    "backpack-for-pytorch==1.7.1",
    "curvlinops-for-pytorch==3.0.1",
    "asdfghjkl==0.1a4",  # provides the `asdl` module laplace-torch imports
    "torchmetrics==1.9.0",
    "lightning-utilities==0.15.3",
    "opt-einsum==3.4.0",
    "einops==0.8.2",
    "einconv==0.1.0",
    "linear-operator==0.6.1",
    "unfoldNd==0.2.3",
)

# The subset the test suite needs (tests/curvature/test_backpack.py): BackPACK alone, without torchvision.
BACKPACK_PINS: tuple[str, ...] = ("backpack-for-pytorch==1.7.1", "einops==0.8.2", "unfoldNd==0.2.3")

# Shared with the project: only installed when missing or too old, never downgraded.
SHARED_REQUIREMENTS: tuple[str, ...] = (
    "numpy>=1.26",
    "scipy>=1.12",
    "tqdm>=4.66",
    "packaging>=22",
    "typing_extensions>=4.0",
)

# The optimiser benchmark's rival (bench/optim.py runs it in a subprocess). kfac-jax 0.0.8 fails at its first
# step on the newest jax ("too many values to unpack" in its graph matcher); jax 0.9.0.1 works. Installed with
# its dependencies resolved by pip, torch pinned on the same command line; jax stays out of the project's own
# requirements and of the tests.
KFAC_JAX_PINS: tuple[str, ...] = ("kfac-jax==0.0.8", "jax==0.9.0.1", "jaxlib==0.9.0.1")

KFAC_JAX_SMOKE_TEST = """
import jax
import jax.numpy as jnp
import kfac_jax

def loss(params, batch):
    x, y = batch
    logits = x @ params["w"] + params["b"]
    kfac_jax.register_sigmoid_cross_entropy_loss(logits, y)
    return jnp.mean(jnp.sum(jnp.logaddexp(0.0, logits) - y * logits, axis=-1))

opt = kfac_jax.Optimizer(
    value_and_grad_func=jax.value_and_grad(loss), l2_reg=0.0, use_adaptive_learning_rate=True,
    use_adaptive_momentum=True, use_adaptive_damping=True, initial_damping=1.0, multi_device=False,
    num_burnin_steps=0,
)
key = jax.random.PRNGKey(0)
params = {"w": 0.1 * jax.random.normal(key, (4, 3)), "b": jnp.zeros(3)}
batch = (jax.random.normal(key, (8, 4)), (jax.random.uniform(key, (8, 3)) > 0.5).astype(jnp.float32))
state = opt.init(params, key, batch)
params, state, stats = opt.step(params, state, key, batch=batch, global_step_int=0)
if not jnp.isfinite(stats["loss"]):
    raise SystemExit("kfac-jax step is not finite")
print("kfac-jax OK")
"""

SMOKE_TEST = """
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import backpack.extensions  # noqa: F401
import curvlinops  # noqa: F401
from laplace import Laplace
from laplace.curvature import CurvlinopsGGN

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
loader = DataLoader(TensorDataset(x, y), batch_size=16)
for kwargs in ({}, {"backend": CurvlinopsGGN, "backend_kwargs": {"stochastic": True}}):
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron", **kwargs)
    la.fit(loader)
    probs = la(x[:4], pred_type="glm", link_approx="probit")
    if not torch.allclose(probs.sum(-1), torch.ones(4), atol=1e-4):
        raise SystemExit("laplace-torch predictive is not normalised")
print("laplace-torch OK")
"""


BACKPACK_SMOKE_TEST = """
import torch
from torch import nn
from backpack import backpack, extend
from backpack.extensions import KFLR

model = extend(nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)))
loss = extend(nn.CrossEntropyLoss())(model(torch.randn(5, 4)), torch.randint(0, 2, (5,)))
with backpack(KFLR()):
    loss.backward()
if model[0].weight.kflr[0].shape != (3, 3):
    raise SystemExit("unexpected BackPACK KFLR factor shape")
print("BackPACK OK")
"""


def _split(requirement: str) -> tuple[str, str, str]:
    """Split ``name<op>version`` into its three parts (only ``==`` and ``>=`` are used here)."""
    for op in ("==", ">="):
        if op in requirement:
            name, version = requirement.split(op, 1)
            return name, op, version
    raise ValueError(f"unsupported requirement {requirement!r}: use '==' or '>='")


def _version_tuple(version: str) -> tuple:
    try:
        from packaging.version import Version

        return (Version(version),)
    except Exception:  # packaging missing or unparsable: compare the numeric prefix
        parts = []
        for piece in version.split("."):
            digits = "".join(ch for ch in piece if ch.isdigit())
            parts.append(int(digits) if digits else 0)
        return tuple(parts)


def unmet(requirements: tuple[str, ...]) -> list[str]:
    """The requirements that the running interpreter does not satisfy."""
    missing = []
    for requirement in requirements:
        name, op, wanted = _split(requirement)
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            missing.append(requirement)
            continue
        if op == "==" and _version_tuple(installed) != _version_tuple(wanted):
            missing.append(requirement)
        elif op == ">=" and _version_tuple(installed) < _version_tuple(wanted):
            missing.append(requirement)
    return missing


def check_torch() -> None:
    """Refuse to run beside a torch other than the pinned one (the pin would replace it)."""
    wanted = _split(TORCH_PIN)[2]
    try:
        installed = metadata.version("torch")
    except metadata.PackageNotFoundError as err:
        raise SystemExit(f"torch is not installed in {sys.executable}; run `make install` first") from err
    if installed.split("+")[0] != wanted:
        raise SystemExit(
            f"{sys.executable} has torch {installed}, but the rivals are pinned beside {TORCH_PIN}; "
            "update TORCH_PIN in bench/install_rivals.py if the project moved on"
        )


def pip_install(requirements: list[str]) -> None:
    """``pip install --no-deps`` with torch pinned on the same command line."""
    command = [sys.executable, "-m", "pip", "install", "--no-deps", TORCH_PIN, *requirements]
    print("+", " ".join(command), file=sys.stderr, flush=True)
    subprocess.run(command, check=True)


def smoke_test(code: str = SMOKE_TEST) -> bool:
    """Runs ``code`` (by default: import laplace-torch, fit a tiny Kronecker Laplace) in a fresh interpreter."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if result.returncode != 0:
        print(result.stdout + result.stderr, file=sys.stderr)
    return result.returncode == 0


def install_kfac_jax(force: bool = False) -> int:
    """kfac-jax and its jax, with dependencies (pip resolves them; torch stays pinned on the command line)."""
    todo = list(KFAC_JAX_PINS) if force else unmet(KFAC_JAX_PINS)
    if not todo and smoke_test(KFAC_JAX_SMOKE_TEST):
        print("already installed: " + ", ".join(KFAC_JAX_PINS), file=sys.stderr)
        return 0
    command = [sys.executable, "-m", "pip", "install", TORCH_PIN, *KFAC_JAX_PINS]
    print("+", " ".join(command), file=sys.stderr, flush=True)
    subprocess.run(command, check=True)
    check_torch()
    if not smoke_test(KFAC_JAX_SMOKE_TEST):
        print("kfac-jax smoke test failed", file=sys.stderr)
        return 1
    print("installed: " + ", ".join(KFAC_JAX_PINS), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="run pip even when every pin looks satisfied")
    parser.add_argument(
        "--backpack-only", action="store_true", help="install only BackPACK (for the test suite), not laplace-torch"
    )
    parser.add_argument(
        "--kfac-jax", action="store_true", help="install only kfac-jax and jax (the optimiser benchmark's rival)"
    )
    args = parser.parse_args(argv)

    check_torch()
    if args.kfac_jax:
        return install_kfac_jax(args.force)
    pins = BACKPACK_PINS if args.backpack_only else RIVAL_PINS
    check = BACKPACK_SMOKE_TEST if args.backpack_only else SMOKE_TEST
    wanted = pins + SHARED_REQUIREMENTS
    todo = list(wanted) if args.force else unmet(wanted)
    if not todo and smoke_test(check):
        print("already installed: " + ", ".join(pins), file=sys.stderr)
        return 0
    if todo:
        pip_install(todo)
    if not smoke_test(check):
        print("smoke test failed after installing " + ", ".join(todo), file=sys.stderr)
        return 1
    print("installed: " + ", ".join(pins), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

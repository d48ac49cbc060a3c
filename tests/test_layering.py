"""The packages import in one direction only: curvature <- app.domain <- (app.api | workers) <- app.cli.

The contracts live in ``pyproject.toml`` (``[tool.importlinter]``) and are checked with import-linter. The
guard itself is tested: the same contracts run on a copy of the sources with one arrow pointing the wrong way
must fail. ``python -m tests.test_layering [PACKAGE ...]`` prints the direct imports between packages.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("curvature", "app.domain", "app.api", "workers", "app.cli")
LINT = str(Path(sys.executable).with_name("lint-imports"))


def package_graph(packages: tuple[str, ...] = LAYERS) -> dict[str, list[str]]:
    """For each package, the other packages it imports directly (``as_packages``: submodules count)."""
    import grimp

    roots = sorted({p.split(".")[0] for p in packages})
    graph = grimp.build_graph(*roots, cache_dir=None)
    edges: dict[str, list[str]] = {}
    for importer, imported in itertools.permutations(packages, 2):
        if importer.startswith(imported + ".") or imported.startswith(importer + "."):
            continue
        if graph.direct_import_exists(importer=importer, imported=imported, as_packages=True):
            edges.setdefault(importer, []).append(imported)
    return edges


def _lint(cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run([LINT, "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_contracts_hold() -> None:
    done = _lint(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


def test_the_layers_form_the_documented_graph() -> None:
    edges = package_graph()
    allowed = {
        "app.domain": {"curvature"},
        "app.api": {"app.domain", "curvature"},
        "workers": {"app.domain", "curvature"},
        "app.cli": {"app.domain", "app.api", "workers", "curvature"},
    }
    assert "curvature" not in edges, edges
    for importer, imported in edges.items():
        assert set(imported) <= allowed[importer], (importer, imported)
    assert "app.domain" in edges["workers"] and "app.domain" in edges["app.api"]


@pytest.mark.parametrize(
    ("module", "wrong_import"),
    [
        ("app/domain/jobs.py", "import workers.actors"),
        ("app/api/routes/fits.py", "import workers.broker"),
        ("workers/runner.py", "import app.api.main"),
        ("curvature/kron.py", "import app.domain.store"),
        ("app/domain/catalog.py", "import fastapi"),
    ],
)
def test_the_guard_fails_on_a_wrong_import(tmp_path: Path, module: str, wrong_import: str) -> None:
    for package in ("app", "workers", "curvature"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{wrong_import}  # noqa\n")
    done = _lint(tmp_path)
    assert done.returncode != 0, done.stdout
    assert "BROKEN" in done.stdout, done.stdout


if __name__ == "__main__":
    for importer, imported in sorted(package_graph(tuple(sys.argv[1:]) or LAYERS).items()):
        print(f"{importer} -> {', '.join(sorted(imported))}")

"""The floors (ARCHITECTURE.md) hold, and import-linter would catch an upward import."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGES = ("app", "ranker", "candidate", "features", "sieve", "protos", "benchmarks", "tests")
LINT = Path(sys.executable).parent / "lint-imports"


def _lint(tree: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run(
        [str(LINT), "--no-cache"], cwd=tree, env=env, capture_output=True, text=True, timeout=120
    )


def _copy(tmp_path: Path) -> Path:
    """The project's packages (Python files only) and pyproject.toml in ``tmp_path``."""
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=_not_python)
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


def _not_python(folder: str, names: list[str]) -> list[str]:
    return [n for n in names if not n.endswith((".py", ".pyi")) and not (Path(folder) / n).is_dir()]


@pytest.fixture(scope="module")
def linter() -> Path:
    if not LINT.exists():
        pytest.fail(f"{LINT} is missing: the dev extra installs import-linter")
    return LINT


def test_the_floors_hold(linter: Path, tmp_path: Path) -> None:
    done = _lint(_copy(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Contracts: 4 kept, 0 broken." in done.stdout


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        ("sieve/errors.py", "import app.config", "sieve is not allowed to import app"),
        ("candidate/index.py", "import ranker.rerank", "candidate is not allowed to import ranker"),
        ("features/reader.py", "import candidate.index", "features is not allowed to import"),
        ("ranker/service.py", "import torch", "ranker.service is not allowed to import torch"),
        ("tests/conftest.py", "import benchmarks.ann", "tests is not allowed to import benchmarks"),
    ],
)
def test_an_upward_import_fails_the_lint(
    linter: Path, tmp_path: Path, module: str, line: str, broken: str
) -> None:
    tree = _copy(tmp_path)
    path = tree / module
    path.write_text(path.read_text() + f"\n{line}  # a deliberate violation\n")
    done = _lint(tree)
    assert done.returncode != 0
    assert broken in done.stdout.replace("\n", " "), done.stdout

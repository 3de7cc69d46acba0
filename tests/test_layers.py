"""The layering contract of pyproject.toml ([tool.importlinter]): each layer imports only the layers below it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))


def _lint(cwd: Path) -> subprocess.CompletedProcess:
    # PYTHONPATH first: the package found is the one under `cwd` (the installed one may be an editable install).
    return subprocess.run([LINT, "--no-cache"], cwd=cwd, env={"PYTHONPATH": str(cwd), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=120)


def test_package_keeps_its_layers():
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


@pytest.mark.parametrize("module, upward", [
    ("io.py", "undo_lightning.data.mcq"),                 # the leaf imports a layer above it
    ("data/module.py", "undo_lightning.eval.metrics"),   # the data <-> evaluation cycle this layout removed
    ("modules/base.py", "undo_lightning.experiment.report"),
])
def test_an_upward_import_breaks_the_contract(tmp_path, module, upward):
    shutil.copytree(ROOT / "undo_lightning", tmp_path / "undo_lightning",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    assert _lint(tmp_path).returncode == 0  # the copy is clean before the edit
    with open(tmp_path / "undo_lightning" / module, "a") as f:
        f.write(f"\nimport {upward}  # deliberate upward import\n")
    result = _lint(tmp_path)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout and upward in result.stdout

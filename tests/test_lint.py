"""ruff and mypy are clean over the whole tree, as `.ci/lint` runs them (mypy reads kvpool's
modules through a tree of links laid out as the package is, so `kvpool.*` imports are checked)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_and_mypy_are_clean() -> None:
    run = subprocess.run(
        ["bash", str(ROOT / ".ci" / "lint")], cwd=ROOT, env={**os.environ, "PY": sys.executable},
        capture_output=True, text=True, timeout=580,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr

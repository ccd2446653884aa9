"""The layers import only downwards: the contract (proto/) nothing else of kvpool; the codec
(kernels/) the contract; the cache tier (services/) the contract, never torch and never the
client; the client (client/) the contract and the codec, never the shard side. The one
exception is the `kvpool` command line (client/cli.py), the entry point of both sides, whose
`serve` subcommand starts the tier."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# folder -> (its import prefix, the prefixes it may import)
LAYERS = {
    "proto": ("kvpool.proto", ("kvpool.proto",)),
    "kernels": ("kvpool.kernels", ("kvpool.proto", "kvpool.kernels")),
    "services": ("kvpool.services", ("kvpool.proto", "kvpool.services")),
    "client": ("kvpool", ("kvpool.proto", "kvpool.kernels", "kvpool.client-side")),
}
SIDE_PACKAGES = ("kvpool.proto", "kvpool.kernels", "kvpool.services")
EXEMPT = {"client/cli.py"}


def kvpool_imports(path: Path) -> list[str]:
    """Every kvpool module `path` imports, at any depth (`from kvpool import x` -> kvpool.x)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "kvpool"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "kvpool":
                found += [f"kvpool.{a.name}" for a in node.names]
            elif node.module.startswith("kvpool."):
                found.append(node.module)
    return found


def allowed(module: str, prefixes: tuple[str, ...]) -> bool:
    for prefix in prefixes:
        if prefix == "kvpool.client-side":  # kvpool.<client module>, not another side's package
            if not module.startswith(SIDE_PACKAGES) and module.startswith("kvpool."):
                return True
        elif module == prefix or module.startswith(prefix + "."):
            return True
    return False


@pytest.mark.parametrize("folder", list(LAYERS))
def test_each_layer_imports_only_downwards(folder: str) -> None:
    _, prefixes = LAYERS[folder]
    bad = []
    for path in sorted((ROOT / folder).glob("*.py")):
        rel = f"{folder}/{path.name}"
        if rel in EXEMPT:
            continue
        bad += [f"{rel}: {m}" for m in kvpool_imports(path) if not allowed(m, prefixes)]
        if folder in ("proto", "services"):
            source = path.read_text()
            bad += [f"{rel}: torch" for line in source.splitlines() if line.strip() in (
                "import torch", "from torch import Tensor")]  # fmt: skip
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_the_tier_loads_neither_torch_nor_the_client() -> None:
    """Importing every module of the cache tier pulls in no torch, codec or client module."""
    modules = [f"kvpool.services.{p.stem}" for p in (ROOT / "services").glob("*.py")]
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in modules if not m.endswith("__init__"))
        + "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith("
        "('kvpool.kernels', 'kvpool.client', 'kvpool.transport', 'kvpool.hf')))\n"
        "print(','.join(loaded))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == ""


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    """The rule would catch a tier module importing the client, at any depth."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "def f():\n    from kvpool.transport import TierClient\n    from kvpool import hf\n"
    )
    found = kvpool_imports(bad)
    assert found == ["kvpool.transport", "kvpool.hf"]
    assert not any(allowed(m, LAYERS["services"][1]) for m in found)
    assert all(allowed(m, LAYERS["client"][1]) for m in found)
    assert not allowed("kvpool.services.tier", LAYERS["client"][1])

"""The layers import only downwards: the contract (proto/) nothing else of kvpool; the codec
(kernels/) the contract; the cache tier (services/) the contract, never torch and never the
client; the client (client/) the contract and the codec, never the shard side. The one
exception is the `kvpool` command line (client/cli.py), the entry point of both sides, whose
`serve` subcommand starts the tier. Within a layer, modules import one another without a cycle
(lazy imports inside functions included). Imports are read at any depth, relative ones
resolved against the file's package, and `torch` counts with its submodules."""

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


def module_name(path: Path, package: str) -> str:
    return package if path.stem == "__init__" else f"{package}.{path.stem}"


def known_modules(root: Path = ROOT) -> set[str]:
    """Every module of kvpool, by import name."""
    return {module_name(p, package) for folder, (package, _) in LAYERS.items()
            for p in (root / folder).glob("*.py")}  # fmt: skip


def imports(path: Path, package: str, known: set[str] | None = None) -> list[str]:
    """Every module `path` (a module of `package`) imports, at any depth, relative imports
    resolved: `from kvpool import x` -> kvpool.x, `from kvpool.kernels import codec` ->
    kvpool.kernels.codec (a module), `from . import x` -> package.x; others by module name."""
    known = known_modules() if known is None else known
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - (node.level - 1)])
                module = f"{base}.{module}" if module else base
            for a in node.names:
                sub = f"{module}.{a.name}"
                found.append(sub if sub in known or module == "kvpool" else module)
    return list(dict.fromkeys(found))


def kvpool_imports(path: Path, package: str = "kvpool", known: set[str] | None = None) -> list[str]:
    """The kvpool modules among `imports`."""
    return [m for m in imports(path, package, known) if m.split(".")[0] == "kvpool"]


def allowed(module: str, prefixes: tuple[str, ...]) -> bool:
    for prefix in prefixes:
        if prefix == "kvpool.client-side":  # kvpool.<client module>, not another side's package
            if not module.startswith(SIDE_PACKAGES) and module.startswith("kvpool."):
                return True
        elif module == prefix or module.startswith(prefix + "."):
            return True
    return False


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a path back to its start) through each group of modules that import one
    another, by depth-first search."""
    found, state = [], dict.fromkeys(graph, 0)  # 0 unseen, 1 on the path, 2 done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                found.append([*path[path.index(nxt) :], nxt])
            elif state.get(nxt) == 0:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if state[node] == 0:
            visit(node)
    return found


def layer_graph(folder: str, root: Path = ROOT) -> dict[str, set[str]]:
    """Each module of the layer -> the modules of the same layer it imports."""
    package = LAYERS[folder][0]
    known = known_modules(root)
    mods = {module_name(p, package): p for p in (root / folder).glob("*.py")}
    return {m: {i for i in kvpool_imports(p, package, known) if i in mods and i != m}
            for m, p in mods.items()}  # fmt: skip


@pytest.mark.parametrize("folder", list(LAYERS))
def test_each_layer_imports_only_downwards(folder: str) -> None:
    package, prefixes = LAYERS[folder]
    bad = []
    for path in sorted((ROOT / folder).glob("*.py")):
        rel = f"{folder}/{path.name}"
        if rel in EXEMPT:
            continue
        found = imports(path, package)
        bad += [f"{rel}: {m}" for m in found if m.split(".")[0] == "kvpool"
                and not allowed(m, prefixes)]  # fmt: skip
        if folder in ("proto", "services"):
            bad += [f"{rel}: {m}" for m in found if m.split(".")[0] == "torch"]
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


@pytest.mark.parametrize("folder", list(LAYERS))
def test_no_import_cycle_inside_a_layer(folder: str) -> None:
    found = cycles(layer_graph(folder))
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


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


def test_the_checker_reads_relative_imports_and_torch_submodules(tmp_path: Path) -> None:
    """A relative import is the module it names; torch's submodules are torch."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import torch.nn\nfrom torch.nn import functional\n"
        "def f():\n    from .. import transport\n    from . import store\n"
        "    from ..kernels.codec import encode\n"
    )
    found = imports(bad, "kvpool.services")
    assert found == ["torch.nn", "kvpool.transport", "kvpool.services.store",
                     "kvpool.kernels.codec"]  # fmt: skip
    assert [m for m in found if m.split(".")[0] == "torch"] == ["torch.nn"]
    assert not allowed("kvpool.transport", LAYERS["services"][1])
    assert not allowed("kvpool.kernels.codec", LAYERS["services"][1])


def test_the_checker_sees_a_cycle(tmp_path: Path) -> None:
    """Two modules of a layer that import each other, one of them lazily, are a cycle; a
    third that only imports them is not part of it."""
    layer = tmp_path / "kernels"
    layer.mkdir()
    for folder in LAYERS:
        (tmp_path / folder).mkdir(exist_ok=True)
    (layer / "a.py").write_text("from kvpool.kernels.b import x\n")
    (layer / "b.py").write_text("def f():\n    from kvpool.kernels import a\n")
    (layer / "c.py").write_text("from . import a, b\n")
    graph = layer_graph("kernels", tmp_path)
    assert graph == {"kvpool.kernels.a": {"kvpool.kernels.b"},
                     "kvpool.kernels.b": {"kvpool.kernels.a"},
                     "kvpool.kernels.c": {"kvpool.kernels.a", "kvpool.kernels.b"}}  # fmt: skip
    assert cycles(graph) == [["kvpool.kernels.a", "kvpool.kernels.b", "kvpool.kernels.a"]]
    (layer / "b.py").write_text("x = 1\n")
    assert cycles(layer_graph("kernels", tmp_path)) == []

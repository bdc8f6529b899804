"""The package's import graph (every import statement, also those inside functions) has
no cycles, and the two top-level folders joined into the package stay independent.

The graph is built with networkx from the source (``ast``), with module names as the
installed package sees them: ``passes/`` and ``schedules/`` map to ``lookupc.passes`` and
``lookupc.schedules`` through pyproject's package-dir table, read here, not repeated.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]


def package_dirs() -> dict[str, Path]:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return {pkg: ROOT / d for pkg, d in cfg["tool"]["setuptools"]["package-dir"].items()}


def modules() -> dict[str, Path]:
    out = {}
    for pkg, folder in package_dirs().items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            name = ".".join([pkg, *parts])
            if name not in out or path.parent == folder:  # a package-dir entry wins
                out[name] = path
    return out


def import_graph() -> nx.DiGraph:
    mods = modules()
    graph = nx.DiGraph()
    graph.add_nodes_from(mods)
    for name, path in mods.items():
        package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in mods:  # a name inside a module: the module
                    target = target.rpartition(".")[0]
                if target and target != name and target != "lookupc":
                    graph.add_edge(name, target)
    return graph


def test_the_graph_sees_the_real_imports():
    graph = import_graph()
    assert graph.has_edge("lookupc.runtime.cpu", "lookupc.kernels.shapes")
    assert graph.has_edge("lookupc.kernels.forward", "lookupc.kernels.shapes")
    assert graph.has_edge("lookupc.passes.api", "lookupc.config")
    assert graph.number_of_nodes() > 40


def test_no_import_cycles():
    cycles = list(nx.simple_cycles(import_graph()))
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c + c[:1]) for c in cycles)


def test_passes_and_schedules_do_not_import_each_other():
    graph = import_graph()
    bad = [(a, b) for a, b in graph.edges
           if {a.split(".")[1:2][0] if "." in a else "", b.split(".")[1:2][0] if "." in b else ""}
           == {"passes", "schedules"}]
    assert not bad, bad


# The pipeline, upstream first: a stage may import the stages before it (and the core
# modules directly under lookupc/), never one after it.
PIPELINE = ["kernels", "schedules", "runtime", "passes|distill|memo", "artifact", "cli"]


def _stage(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) < 3:  # lookupc.config, lookupc.dispatch, ...: the core every stage uses
        return None
    for i, names in enumerate(PIPELINE):
        if parts[1] in names.split("|"):
            return i
    return None


def test_the_pipeline_imports_only_upstream():
    graph = import_graph()
    bad = [(a, b) for a, b in graph.edges
           if _stage(a) is not None and _stage(b) is not None and _stage(b) > _stage(a)
           and not (a.startswith("lookupc.passes") and b.startswith("lookupc.artifact.st_format"))]
    assert not bad, "imports against the pipeline: " + ", ".join(f"{a} -> {b}" for a, b in bad)


def test_nothing_but_the_cli_imports_the_cli():
    graph = import_graph()
    bad = [(a, b) for a, b in graph.edges
           if b.startswith("lookupc.cli") and not a.startswith("lookupc.cli")]
    assert not bad, bad


def test_every_subpackage_ships_in_the_wheel():
    """pyproject lists packages explicitly: a new folder left out would import in a
    checkout and be missing from the wheel."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set()
    for pkg, folder in package_dirs().items():
        for init in folder.rglob("__init__.py"):
            parts = init.parent.relative_to(folder).parts
            found.add(".".join([pkg, *parts]))
    assert found == listed, {"missing from pyproject": found - listed, "not found": listed - found}

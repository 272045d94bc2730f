"""The import graph of ``src/pipeline`` keeps the shape ../shared/DESIGN.md draws: read with ast
from every module (imports inside functions count), grouped by package (a top-level module is its
own package):

- no import cycle between packages;
- the core imports no science, and no science imports another (a science needing another's
  result reads its artifact);
- figures read tables: ``plots`` imports only ``io`` and ``registry``;
- nothing in ``pipeline`` imports Snakemake.

:data:`KNOWN` lists the exceptions still in the tree, each with its reason; the test also fails
when one of them is gone, so the list only shrinks.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "src" / "pipeline"


def _sciences() -> set[str]:
    """The packages that register a study kind, a study part or a metric: a new science's
    package counts as one without being listed here."""
    from pipeline.metric_registry import register_metric
    from pipeline.studies import register_study_kind, register_study_part

    registries = (register_study_kind, register_study_part, register_metric)
    return {e.module.split(".")[1] for r in registries for e in r.entries().values()}


#: the sciences, one package each
SCIENCES = {s: s for s in sorted(_sciences())}
#: (importer, imported) node pairs that break a rule today, and why
KNOWN: dict[tuple[str, str], str] = {}


def _node(module: str) -> str:
    """The graph node of a dotted module under ``pipeline``."""
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "pipeline"
    return SCIENCES.get(top, top)


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), ast.parse(path.read_text(), str(path))


def _imports(tree: ast.AST) -> set[str]:
    """Every module an import statement names (``from pipeline import io`` names both
    ``pipeline`` and ``pipeline.io``)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def graph() -> tuple[dict[str, set[str]], set[str]]:
    """``(node -> nodes it imports, third-party top-level names)``."""
    edges: dict[str, set[str]] = defaultdict(set)
    external: set[str] = set()
    for module, tree in _modules():
        here = _node(module)
        for name in _imports(tree):
            if name.startswith("pipeline."):
                there = _node(name)
                if there != here:
                    edges[here].add(there)
            elif name != "pipeline":
                external.add(name.split(".")[0])
    return edges, external


def cycles(edges: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in sorted(set(edges) | {w for ws in edges.values() for w in ws}):
        if v not in index:
            visit(v)
    return out


def violations(edges: dict[str, set[str]]) -> set[tuple[str, str]]:
    sciences = set(SCIENCES.values())
    bad = set()
    for a, targets in edges.items():
        for b in targets:
            if b in sciences:  # core -> science, or science -> another science
                bad.add((a, b))
            if a == "plots" and b not in ("io", "registry"):
                bad.add((a, b))
    return bad


def test_the_sciences_are_found_from_their_registrations():
    assert {"mechanics", "teleport", "modelsym", "masks", "recovery", "pruning"} <= set(SCIENCES)
    assert not set(SCIENCES) & {"models", "train", "data", "symmetry", "plots", "claims"}


def test_no_package_cycles():
    edges, _ = graph()
    assert cycles(edges) == []


def test_the_core_imports_no_science_and_no_science_another():
    edges, _ = graph()
    found = violations(edges)
    assert found - set(KNOWN) == set(), "new imports against the layering"
    assert set(KNOWN) - found == set(), "a known exception is gone: remove it from KNOWN"


def test_nothing_in_the_package_imports_snakemake():
    _, external = graph()
    assert "snakemake" not in external


@pytest.mark.parametrize(
    "edges, expected",
    [
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [{"a", "b", "c"}]),
        ({"a": {"b"}, "b": set()}, []),
    ],
)
def test_cycle_finder(edges, expected):
    assert cycles(edges) == expected


def test_the_rules_see_a_science_importing_another_and_the_core_importing_a_science():
    assert violations({"masks": {"recovery", "io"}, "train": {"mechanics"}}) == {
        ("masks", "recovery"),
        ("train", "mechanics"),
    }
    assert violations({"plots": {"io", "models"}}) == {("plots", "models")}

"""Print the shape of src/budwood: the longest functions and the import graph between packages.

Used before and after a redesign (numbers in the closing note) and by tests/test_architecture.py,
which fails on a cycle between packages. Reads the source with `ast`; imports nothing of budwood.

    python scripts/architecture_report.py            # longest functions + package edges + cycles
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "budwood"


def unit_of(path: Path) -> str:
    """The package a module belongs to: `train` for train/recipe.py, `cli` for cli/train.py, `config` for config.py."""
    rel = path.relative_to(SRC)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imported_units(path: Path) -> set[str]:
    """Every budwood unit a module imports, at module level or inside functions (both count)."""
    units: set[str] = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] if node.module != "budwood" else [f"budwood.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "budwood" and len(parts) > 1 and not parts[1].startswith("__"):
                units.add(parts[1])  # `from budwood import __version__` is the package's metadata, not a unit
    return units


def package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for path in SRC.rglob("*.py"):
        src = unit_of(path)
        graph[src]
        for dst in imported_units(path):
            if dst != src:
                graph[src].add(dst)
    return dict(graph)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one unit (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def function_lengths() -> list[tuple[int, str]]:
    out = []
    for path in SRC.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                out.append((node.end_lineno - node.lineno + 1, f"{path.relative_to(SRC)}:{node.lineno} {node.name}"))
    return sorted(out, reverse=True)


# The allowed direction: a unit imports only units of lower layers (never its own layer, never upwards).
# Stages sit below the surfaces that expose them (serve, jobs, web, cli); docs/architecture.md draws it.
LAYERS: list[tuple[str, ...]] = [
    ("errors", "hashing", "allocator"),
    ("db", "models", "data", "safeyaml"),
    ("config", "artifacts"),
    ("interop",),
    ("engine",),
    ("eval",),
    ("reliability",),
    ("train",),
    ("card",),
    ("registry",),
    ("merge",),
    ("serve",),
    ("pipeline",),
    ("jobs",),
    ("web",),
    ("service_app",),
    ("cli", "__init__"),
    ("__main__",),
]


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    """Each import that goes sideways or upwards, and each unit no layer names."""
    layer = {unit: i for i, units in enumerate(LAYERS) for unit in units}
    problems = [f"{unit}: in no layer of LAYERS (scripts/architecture_report.py)" for unit in graph
                if unit not in layer]
    for src, dsts in sorted(graph.items()):
        for dst in sorted(dsts):
            if src in layer and dst in layer and layer[dst] >= layer[src]:
                problems.append(f"{src} imports {dst} (layer {layer[src]} -> {layer[dst]}: only lower layers)")
    return problems


def main() -> int:
    lengths = function_lengths()
    print("longest functions:")
    for n, where in lengths[:15]:
        print(f"  {n:4d}  {where}")
    print(f"functions over 80 lines: {sum(1 for n, _ in lengths if n > 80)}")
    graph = package_graph()
    found = cycles(graph)
    print(f"package import cycles: {len(found)}")
    for comp in found:
        print("  " + " <-> ".join(comp))
    violations = layering_violations(graph)
    print(f"imports against the layering: {len(violations)}")
    for v in violations:
        print("  " + v)
    return 0


if __name__ == "__main__":
    sys.exit(main())

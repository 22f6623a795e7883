"""The package's import graph has no cycles (top-level and function-level ``mtp.*`` imports alike),
and its arrows point down the layers: commands (cli, bench, plan, sweep, study) -> train, decode,
evals, convert, workdir -> model, losses, data, sharding, kernels -> config, log, distributed.

    python tests/test_import_graph.py      # prints every cycle and every upward arrow, if any

An edge A -> B means module A names module B in an ``import`` anywhere in its source (``from
mtp.decode import weights`` names the submodule ``mtp.decode.weights``; ``from mtp.convert import
ConvertError`` names the package ``mtp.convert``). Importing a submodule also runs its package's
``__init__``, but that implicit edge is left out: it cannot deadlock, since the package is imported
first.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "mtp"


def module_names() -> dict[str, Path]:
    """``mtp.x.y`` -> its file, for every module of the package."""
    names = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def import_graph() -> dict[str, set[str]]:
    modules = module_names()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from .x import y
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + [base]).strip(".")
                # a name that is a submodule is an import of that module; any other name is the package's
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:  # `import mtp.a.b.c` of a name in mtp.a.b
                    target = target.rpartition(".")[0]
                if target and target != module:
                    graph[module].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer(module: str) -> int:
    """3: commands, 2: programs over a model, 1: the model and its data, 0: the bottom."""
    if module in ("mtp.cli", "mtp.plan", "mtp.study") or module.startswith(("mtp.bench", "mtp.sweep")) \
            or module.endswith(".cli"):
        return 3
    if module.startswith(("mtp.train", "mtp.decode", "mtp.evals", "mtp.convert")) or module == "mtp.workdir":
        return 2
    if module.startswith(("mtp.model", "mtp.data", "mtp.kernels")) or module in ("mtp.losses", "mtp.sharding",
                                                                                  "mtp.perf"):
        return 1
    return 0


def upward_arrows(graph: dict[str, set[str]]) -> list[str]:
    return [f"{a} (layer {layer(a)}) -> {b} (layer {layer(b)})"
            for a in sorted(graph) for b in sorted(graph[a]) if layer(b) > layer(a)]


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles (each line one strongly connected component):\n" + "\n".join(
        " <-> ".join(c) for c in found)


def test_imports_point_down_the_layers():
    up = upward_arrows(import_graph())
    assert not up, "imports of a higher layer (move the shared piece down):\n" + "\n".join(up)


if __name__ == "__main__":
    sys.setrecursionlimit(10_000)
    graph = import_graph()
    found, up = cycles(graph), upward_arrows(graph)
    for component in found:
        print(" <-> ".join(component))
    for arrow in up:
        print("up:", arrow)
    print(f"{len(found)} import cycle(s), {len(up)} upward import(s) in {PACKAGE}")
    sys.exit(1 if found or up else 0)

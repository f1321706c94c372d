"""The package's import graph, read from the source: no cycle (function-level imports counted, so
none can hide one), and Ray imported only by the modules that run the search."""

from __future__ import annotations

import ast
from pathlib import Path

import newllm

PACKAGE = Path(newllm.__file__).parent
# the modules that may import ray: the search, its trainable and its results callback
RAY_MODULES = {"search", "trainable", "results"}


def imports() -> dict[str, set[str]]:
    """Module -> the top-level packages and newllm modules it imports, at any level of its code."""
    graph = {}
    for path in sorted(PACKAGE.glob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                parts = node.module.split(".")
                names.add(f"newllm.{parts[1]}" if parts[0] == "newllm" and len(parts) > 1 else parts[0])
                if node.module == "newllm":
                    names.update(f"newllm.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                names.update(".".join(a.name.split(".")[:2]) if a.name.startswith("newllm.") else a.name.split(".")[0]
                             for a in node.names)
        graph[path.stem] = names
    return graph


def test_the_package_has_no_import_cycle():
    graph = {m: {n.removeprefix("newllm.") for n in names if n.startswith("newllm.")} - {m}
             for m, names in imports().items()}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        assert module not in path, "import cycle: " + " -> ".join([*path[path.index(module):], module])
        if module in done or module not in graph:
            return
        for dep in sorted(graph[module]):
            visit(dep, [*path, module])
        done.add(module)

    for module in graph:
        visit(module, [])


def test_only_the_search_modules_import_ray():
    assert {m for m, names in imports().items() if "ray" in names} == RAY_MODULES

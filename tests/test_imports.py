"""The package's import graph, read from the source (``ast``): no cycle, Ray imported only under
``newllm/search/``, and no import of newllm's own modules deferred into a function (where it
could hide a cycle), but the one of the optional Hugging Face export."""

from __future__ import annotations

import ast
from pathlib import Path

import newllm

PACKAGE = Path(newllm.__file__).parent
# deferred on purpose: newllm.hf needs transformers, an optional extra ([hf])
DEFERRED_OK = {("export", "hf")}


def module_name(path: Path) -> str:
    """``search.cli`` for newllm/search/cli.py, ``search`` for newllm/search/__init__.py."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(node: ast.AST) -> set[str]:
    """What an import statement imports: newllm modules by name (``search.cli``), other packages
    by their top-level name."""
    if isinstance(node, ast.Import):
        return {a.name.removeprefix("newllm.") if a.name.startswith("newllm.") else a.name.split(".")[0]
                for a in node.names}
    if not isinstance(node, ast.ImportFrom) or node.level != 0 or node.module is None:
        return set()
    if node.module != "newllm" and not node.module.startswith("newllm."):
        return {node.module.split(".")[0]}
    base = node.module.removeprefix("newllm").lstrip(".")
    names = {f"{base}.{a.name}".lstrip(".") for a in node.names}
    return {n for n in names if n in MODULES} or {base}


def imports(deferred: bool = False) -> dict[str, set[str]]:
    """Module -> what it imports: at any level of its code, or (``deferred``) inside functions only."""
    graph = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        nodes = [n for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for n in ast.walk(f)] if deferred else list(ast.walk(tree))
        graph[name] = set().union(*(imported(n) for n in nodes))
    return graph


def test_the_package_has_no_import_cycle():
    graph = {m: {n for n in names if n in MODULES} - {m} for m, names in imports().items()}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        assert module not in path, "import cycle: " + " -> ".join([*path[path.index(module):], module])
        if module in done:
            return
        for dep in sorted(graph[module]):
            visit(dep, [*path, module])
        done.add(module)

    for module in graph:
        visit(module, [])


def test_only_the_search_package_imports_ray():
    importers = {m for m, names in imports().items() if "ray" in names}
    assert importers and all(m.startswith("search.") for m in importers), sorted(importers)
    assert {"search.cli", "search.algorithms", "search.trainable", "search.callbacks"} <= importers


def test_no_import_of_newllm_is_deferred_into_a_function_but_the_optional_export():
    deferred = {(m, n) for m, names in imports(deferred=True).items() for n in names if n in MODULES}
    assert deferred == DEFERRED_OK

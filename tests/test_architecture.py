"""The shape of the package: no import cycles, light modules stay light, lazy imports say why."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import graft

SOURCE = Path(graft.__file__).parent


def _modules() -> dict[str, ast.Module]:
    trees = {}
    for path in SOURCE.rglob("*.py"):
        parts = ["graft", *path.relative_to(SOURCE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        trees[".".join(parts)] = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        trees[".".join(parts)].lines = path.read_text(encoding="utf-8").splitlines()
    return trees


def _type_checking_nodes(tree: ast.Module) -> set[int]:
    return {id(node) for block in ast.walk(tree) if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
            for node in ast.walk(block)}


def _imported(node: ast.Import | ast.ImportFrom, known: dict[str, ast.Module]) -> list[str]:
    """The graft modules an import statement loads (`from graft.x import y` loads graft.x.y if it is a module)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module for alias in node.names]
    return [name for name in names if name in known and name != "graft"]


def _run_time_imports(trees: dict[str, ast.Module]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, tree in trees.items():
        skip = _type_checking_nodes(tree)
        graph[name] = {target for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in skip
                       for target in _imported(node, trees)}
    return graph


def test_no_module_imports_one_that_imports_it_back():
    graph = _run_time_imports(_modules())
    cycles = []
    for start in graph:
        stack, seen = [(start, [start])], set()
        while stack:
            module, path = stack.pop()
            for target in graph[module]:
                if target == start:
                    cycles.append(" -> ".join(path + [start]))
                elif target not in seen:
                    seen.add(target)
                    stack.append((target, path + [target]))
    assert cycles == []


def test_graft_imports_inside_functions_each_give_their_reason():
    """A graft module is imported inside a function only to keep a heavy library (torch for the CLI,
    matplotlib, fastapi) from loading before it is needed; the line says so."""
    trees, unexplained = _modules(), []
    for name, tree in trees.items():
        for function in ast.walk(tree):
            if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(function):
                    if isinstance(node, (ast.Import, ast.ImportFrom)) and _imported(node, trees) and "#" not in tree.lines[node.lineno - 1]:
                        unexplained.append(f"{name}:{node.lineno}")
    assert unexplained == []


def test_the_cli_and_the_config_load_without_torch():
    code = ("import sys, graft.cli.main, graft.config; "
            "print(sorted(m for m in ('torch', 'timm', 'matplotlib', 'fastapi') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"

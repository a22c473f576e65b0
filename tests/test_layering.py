"""The code's layering: import-linter contracts (pyproject.toml), no import cycle, self-contained kernels."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_linter_contracts_are_kept():
    if shutil.which("lint-imports") is None:
        pytest.fail("import-linter is a dev dependency: pip install -e '.[dev]'")
    run = subprocess.run(["lint-imports"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "0 broken" in run.stdout


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for node in list(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle():
    import grimp

    graph = grimp.build_graph("compress")
    edges = {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    # `from ..kernels import` in compress.modules.*: kernels/ is outside the scanned tree (package-dir)
    for module in edges:
        if module.startswith("compress.modules."):
            edges[module].discard("compress")
    assert _cycles(edges) == []
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the check itself


def test_kernels_import_nothing_of_llmpress():
    """kernels/ holds kernels, launchers and references only: no compressor, module or pipeline."""
    for path in (ROOT / "kernels").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.level <= 1 and not (node.module or "").startswith("compress"), f"{path.name}: {ast.unparse(node)}"
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("compress") for a in node.names), f"{path.name}: {ast.unparse(node)}"

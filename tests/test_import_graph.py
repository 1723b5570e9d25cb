"""The modules of `core/` and `formats/` import without cycles among the project's modules.

Every import counts, function-local ones too (a lazy import only hides a cycle): the graph is read from
each module's source with `ast`. Every module is also imported for real, in a fresh interpreter.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "formats")


def _modules() -> dict[str, Path]:
    return {f"forgetting.{pkg}.{path.stem}": path for pkg in PACKAGES for path in sorted((ROOT / pkg).glob("*.py"))
            if path.stem != "__init__"}


def _imports(path: Path, known: set[str]) -> set[str]:
    """The project modules `path` imports anywhere in its source (`from forgetting.core import x` names the
    module forgetting.core.x; `import forgetting.core.x` and `from forgetting.core.x import y` name x)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found & known


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph (as a path that returns to its start), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_core_and_formats_have_no_import_cycle():
    modules = _modules()
    assert {"forgetting.core.layers", "forgetting.core.matmul", "forgetting.formats.gguf_checkpoint",
            "forgetting.formats.hf_checkpoint", "forgetting.formats.hf_tokenizer"} <= set(modules)
    graph = {name: _imports(path, set(modules)) - {name} for name, path in modules.items()}
    assert "forgetting.formats.hf_tokenizer" in graph["forgetting.formats.gguf_checkpoint"]  # the reader sees imports
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


@pytest.mark.parametrize("package", PACKAGES)
def test_every_module_imports(package):
    names = [name for name in _modules() if name.startswith(f"forgetting.{package}.")]
    script = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    done = subprocess.run([sys.executable, "-c", script, *names], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_only_the_backend_reads_the_implementation_switch():
    """The implementation is chosen in one place (`core.backend`): no other core module reads `.impl` or
    resolves it; the model code asks the kernels record instead."""
    readers = []
    for name, path in _modules().items():
        if not name.startswith("forgetting.core.") or name == "forgetting.core.backend":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("impl", "resolve_impl", "auto_impl"):
                readers.append(f"{name}:{node.lineno}")
    assert readers == []

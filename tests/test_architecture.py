"""The package structure stays a DAG (issue: a codebase a newcomer can walk straight through).

Parsed from the source with `ast`, so the check fails the moment a cycle comes back, whether the
import sits at module level or inside a function (where cycles used to hide).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "premoe"
MAX_LINES = 500


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package(module: str) -> str:
    """`premoe.x` for modules of package or module x (`premoe` itself for the top)."""
    return ".".join(module.split(".")[:2])


def _imports() -> list[tuple[str, str, int, bool]]:
    """(importing module, imported premoe module, line, inside a function) for every import."""
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        mod = _module(path)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                if name == "premoe" or name.startswith("premoe."):
                    out.append((mod, name, node.lineno, node.col_offset > 0))
    return out


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for mod, target, _, _ in _imports():
        a, b = _package(mod), _package(target)
        if a != b and b != "premoe":
            graph[a].add(b)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_packages_import_each_other_without_cycles() -> None:
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle between premoe packages: " + " -> ".join(cycle or [])


def test_cycle_detector_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}}) is None


def test_long_modules_say_why() -> None:
    """Modules over ~500 lines state at their top why they are one module."""
    long = []
    for path in sorted(ROOT.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > MAX_LINES and "One module because" not in text[:4000]:
            long.append(f"{path.relative_to(ROOT.parent)} ({text.count(chr(10))} lines)")
    assert not long, "split these modules or say why at their top: " + ", ".join(long)

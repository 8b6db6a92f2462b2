"""The house holds: imports of ``rlhf`` modules point down only. Read from the source with
``ast`` (every import, those inside functions too, so a lazy import cannot hide a cycle):
no cycles; ``rlhf/core`` imports nothing else of ``rlhf``; only the trainers themselves, the
trainer registry (``rlhf/trainers/__init__.py``, which names them as strings), the CLI and the
Python API reach into ``rlhf.trainers``."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "rlhf"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(name: str, modules: set[str]) -> str | None:
    """The module of ``rlhf`` that importing ``name`` loads (``rlhf.core.gae`` -> ``rlhf.core``)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imported_names(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every dotted name an import statement anywhere in ``tree`` loads (relative ones resolved)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + is_package]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names |= {f"{base}.{a.name}" for a in node.names}  # from pkg import submodule
    return names


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    graph = {}
    for mod, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        targets = {resolve(n, modules) for n in imported_names(tree, mod, path.name == "__init__.py")}
        graph[mod] = {t for t in targets if t and t != mod}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
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


def test_the_graph_sees_function_level_and_relative_imports():
    tree = ast.parse("def f():\n    from rlhf.trainers.lm import train\nfrom . import b\n")
    assert imported_names(tree, "rlhf.x", False) >= {"rlhf.trainers.lm", "rlhf.b"}
    graph = import_graph()
    assert "rlhf.core" in graph["rlhf.trainers.lm"]  # a sanity check that edges are found at all
    assert "rlhf.trainers" in graph["rlhf.cli"]       # ... including imports inside functions


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_core_imports_nothing_else_of_rlhf():
    bad = {m: sorted(d for d in deps if not d.startswith("rlhf.core"))
           for m, deps in import_graph().items() if m.startswith("rlhf.core")}
    assert not any(bad.values()), {m: d for m, d in bad.items() if d}


def test_only_trainers_and_the_cli_import_trainers():
    allowed = ("rlhf.trainers", "rlhf.cli", "rlhf.api")  # the trainers, their registry, the command line and
    # its Python twin (rlhf.train / rlhf.evaluate)
    bad = {m: sorted(d for d in deps if d == "rlhf.trainers" or d.startswith("rlhf.trainers."))
           for m, deps in import_graph().items()
           if not (m in allowed or m.startswith("rlhf.trainers."))}
    assert not any(bad.values()), {m: d for m, d in bad.items() if d}

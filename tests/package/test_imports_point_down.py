"""The house holds: imports of ``rlhf`` modules point down only. Read from the source with
``ast`` (every import, those inside functions too, so a lazy import cannot hide a cycle):
no cycles; ``rlhf/core`` imports nothing else of ``rlhf``; only the trainers themselves, the
trainer registry (``rlhf/trainers/__init__.py``, which names them as strings) and the Python API
(which the CLI calls) reach into ``rlhf.trainers``. No module uses another's private names
(``_name``). Files stay readable: at most 400 lines a file, 60 a function."""
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


def from_base(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The module a ``from ... import`` reads from (a relative one resolved against ``module``)."""
    base = node.module or ""
    if node.level:
        anchor = module.split(".")[: len(module.split(".")) - node.level + is_package]
        base = ".".join(anchor + ([base] if base else []))
    return base


def imported_names(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every dotted name an import statement anywhere in ``tree`` loads (relative ones resolved)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = from_base(node, module, is_package)
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
    assert "rlhf.trainers" in graph["rlhf.api"]       # ... including imports inside functions


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_core_imports_nothing_else_of_rlhf():
    bad = {m: sorted(d for d in deps if not d.startswith("rlhf.core"))
           for m, deps in import_graph().items() if m.startswith("rlhf.core")}
    assert not any(bad.values()), {m: d for m, d in bad.items() if d}


def test_only_trainers_and_the_api_import_trainers():
    allowed = ("rlhf.trainers", "rlhf.api")  # the trainers, their registry and the Python API (rlhf.train /
    # rlhf.evaluate, which the command line calls)
    bad = {m: sorted(d for d in deps if d == "rlhf.trainers" or d.startswith("rlhf.trainers."))
           for m, deps in import_graph().items()
           if not (m in allowed or m.startswith("rlhf.trainers."))}
    assert not any(bad.values()), {m: d for m, d in bad.items() if d}


# ---------------------------------------------------------------------------- private names
def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def dotted(node: ast.AST) -> str | None:
    """``a.b.c`` of a chain of names and attributes, else None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and (base := dotted(node.value)):
        return f"{base}.{node.attr}"
    return None


def private_uses(tree: ast.AST, module: str, is_package: bool, modules: set[str]) -> list[str]:
    """``from rlhf.x import _y`` and ``x._y`` on an imported ``rlhf`` module ``x``, where ``x`` is
    not ``module`` itself; each as ``line: what``."""
    bound: dict[str, str] = {}  # local name -> the rlhf module it is bound to
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:
                    bound[a.asname] = a.name
                else:
                    bound[a.name.partition(".")[0]] = a.name.partition(".")[0]
        elif isinstance(node, ast.ImportFrom):
            base = from_base(node, module, is_package)
            for a in node.names:
                if f"{base}.{a.name}" in modules:
                    bound[a.asname or a.name] = f"{base}.{a.name}"
                if is_private(a.name) and base in modules and base != module:
                    found.append(f"{node.lineno}: from {base} import {a.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and is_private(node.attr) and (name := dotted(node.value)):
            root, _, rest = name.partition(".")
            target = bound.get(root, "") + (f".{rest}" if rest else "")
            if target in modules and target != module:
                found.append(f"{node.lineno}: {target}.{node.attr}")
    return found


def all_private_uses() -> dict[str, list[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    out = {}
    for mod, path in sorted(files.items()):
        uses = private_uses(ast.parse(path.read_text(), str(path)), mod, path.name == "__init__.py", set(files))
        if uses:
            out[str(path.relative_to(ROOT))] = uses
    return out


def test_the_private_name_check_sees_both_forms():
    modules = {"rlhf", "rlhf.a", "rlhf.b", "rlhf.pkg", "rlhf.pkg.c"}
    src = ("from rlhf.a import _x, y\nfrom rlhf import b\nimport rlhf.pkg.c as C\nfrom . import c\n"
           "def f():\n    return b._z, C._w, c._v, b.__name__, _own, rlhf.a.ok\n")
    uses = private_uses(ast.parse(src), "rlhf.pkg.d", False, modules)
    assert uses == ["1: from rlhf.a import _x", "6: rlhf.b._z", "6: rlhf.pkg.c._w", "6: rlhf.pkg.c._v"]
    assert private_uses(ast.parse("from rlhf.a import _x\n"), "rlhf.a", False, modules) == []


def test_no_module_uses_another_modules_private_names():
    assert all_private_uses() == {}


# ---------------------------------------------------------------------------- sizes
MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 60


def test_no_file_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in sorted(PACKAGE.rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES}
    assert not long, long


def test_no_function_over_60_lines():
    long = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                if (n := node.end_lineno - first + 1) > MAX_FUNCTION_LINES:
                    long[f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"] = n
    assert not long, long


def test_no_module_shadows_a_name_of_the_api():
    """``rlhf.evaluate`` is a function: a submodule of that name would replace it on import."""
    import rlhf
    import rlhf.api

    clash = [n for n in rlhf.__all__ if (PACKAGE / f"{n}.py").exists() or (PACKAGE / n).is_dir()]
    assert not clash, clash
    assert rlhf.evaluate is rlhf.api.evaluate and rlhf.train is rlhf.api.train

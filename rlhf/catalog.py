"""What ships with the package: the recipes (``rlhf recipes``, ``rlhf train NAME``) and the
documentation of every recipe key (``rlhf keys [ALGO]``), read from the one-line comments
beside the fields of the config dataclasses, so the docs live in one place.

The recipes are ``rlhf/recipes/``: in a clone a link to the top-level ``recipes/``; in an
installed package, package data copied from it.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import io
import textwrap
import tokenize
from pathlib import Path

from rlhf.errors import UserError


def recipes_dir() -> Path:
    return Path(__file__).resolve().parent / "recipes"


def list_recipes() -> list[tuple[str, str]]:
    """(name, first comment line) of every installed recipe, sorted by name."""
    out = []
    for path in sorted(recipes_dir().glob("*.yaml")):
        first = next((line.lstrip("#").strip() for line in path.read_text().splitlines()
                      if line.startswith("#")), "")
        out.append((path.stem, first))
    return out


def find_recipe(arg: str) -> str:
    """A recipe argument as a file: an existing path is itself; a bare name (``grpo_arith``,
    ``grpo_arith.yaml``) is the installed recipe of that name."""
    if Path(arg).expanduser().is_file() or "/" in arg or "\\" in arg:
        return arg  # a path (a missing one is reported by load_recipe)
    stem = arg[:-len(".yaml")] if arg.endswith(".yaml") else arg
    installed = recipes_dir() / f"{stem}.yaml"
    if installed.is_file():
        return str(installed)
    close = difflib.get_close_matches(stem, [name for name, _ in list_recipes()], n=3)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise UserError(f"recipe {arg!r} is neither a file nor an installed recipe; {hint}`rlhf recipes` lists "
                    "the installed ones")


def field_docs(cls) -> dict[str, str]:
    """Each dataclass field's comment: the ``# ...`` on its line plus the comment-only lines
    below it that start in the same column (a wrapped comment); a subclass's over its bases'."""
    docs: dict[str, str] = {}
    for base in reversed(cls.__mro__):
        if dataclasses.is_dataclass(base) and base is not object:
            docs.update(class_field_docs(base))
    return docs


def class_field_docs(cls) -> dict[str, str]:
    """``field_docs`` of the fields ``cls`` itself declares."""
    source = textwrap.dedent(inspect.getsource(cls))
    fields = {node.lineno: node.target.id for node in ast.parse(source).body[0].body
              if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)}
    docs: dict[str, str] = {}
    last = None  # (field, column of its comment, line of the comment seen last)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type != tokenize.COMMENT:
            continue
        line, col = tok.start
        text = tok.string.lstrip("#").strip()
        if line in fields:
            docs[fields[line]] = text
            last = (fields[line], col, line)
        elif last and col == last[1] and line == last[2] + 1:
            docs[last[0]] += " " + text
            last = (last[0], col, line)
        else:
            last = None
    return docs


def config_keys(cls) -> list[tuple[str, object, str]]:
    """(key, default, doc) of every field of a config class, in declaration order."""
    docs = field_docs(cls)
    out = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        out.append((f.name, default, docs.get(f.name, "")))
    return out


def families(algo: str | None = None) -> list[type]:
    """The config classes (LM, agent, gym) that hold ``algo`` (all of them for None)."""
    from rlhf.config import CONFIGS, AgentConfig

    classes = list(dict.fromkeys([*CONFIGS.values(), AgentConfig]))
    if algo is None:
        return classes
    chosen = [c for c in classes if algo in c.choices["algo"]]
    if not chosen:
        valid = sorted({a for c in classes for a in c.choices["algo"]})
        raise UserError(f"unknown algo {algo!r}; valid: {', '.join(valid)}")
    return chosen

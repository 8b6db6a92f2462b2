"""Recipe text to a key: value mapping: the YAML file (safe loader), ``--set key=value``
overrides, a run directory's resolved ``recipe.yaml``. Nothing here knows the keys; rlhf/config.py
turns the mapping into a typed config."""
from __future__ import annotations

from pathlib import Path

import yaml

from rlhf.errors import UserError


def read_recipe(path: str) -> dict:
    """The key: value mapping of a YAML recipe file (safe loader), unvalidated."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"recipe {path!r} does not exist; see recipes/ for examples")
    return _mapping(p, f"recipe {path!r}")


def apply_overrides(values: dict, overrides) -> dict:
    """``values`` updated by ``key=value`` items, each value read as YAML (``lr=1e-4`` is a
    number, ``rewards=[a, b]`` a list; what is not YAML stays text). A later item wins."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set {item!r} must look like key=value")
        try:
            values[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError:
            values[key.strip()] = raw
    return values


def read_run_recipe(run_dir: str) -> dict:
    """The resolved recipe a run directory holds (its ``recipe.yaml``)."""
    path = Path(run_dir) / "recipe.yaml"
    if not path.is_file():
        raise UserError(f"{run_dir!r} is not a run directory (no recipe.yaml); pass the run_dir "
                        "printed by `rlhf train`")
    return _mapping(path, repr(str(path)))


def _mapping(path: Path, name: str) -> dict:
    """The YAML mapping in ``path`` (safe loader), or one sentence naming the file as ``name``."""
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{name} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(values, dict):
        raise UserError(f"{name} must be a mapping of key: value")
    return values

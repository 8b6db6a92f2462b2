"""An ``env:`` value turned into a text environment (``rlhf.agents.text_envs`` says what one is):

    FrozenLake-v1, CliffWalking-v1, Taxi-v4, Blackjack-v1, FrozenLakeRandom-v0
                            a gymnasium id with a shipped text rendering
    module:Class            a class importable from ``module``
    path/to/file.py:Class   a class defined in that file
    (either of the two)     a TRL environment_factory class (reset, no step), unchanged (``rlhf.agents.tool_env``)

A class is instantiated with the recipe's ``env_kwargs``; it must have ``reset`` and ``step``.
"""
from __future__ import annotations

import importlib
import importlib.util
from functools import partial
from pathlib import Path
from typing import Callable

from rlhf.agents.text_envs import RENDERED
from rlhf.agents.tool_env import ToolEnvironment, is_tool_environment
from rlhf.errors import UserError


def env_factory(spec: str, kwargs: dict | None = None) -> Callable[[], object]:
    """A function that makes a fresh text environment of ``spec`` (one per episode)."""
    kwargs = dict(kwargs or {})
    cls = env_class(spec)
    if isinstance(cls, type) and is_tool_environment(cls):  # a TRL environment_factory class, unchanged
        cls = partial(ToolEnvironment, cls)

    def make():
        try:
            env = cls(**kwargs)
        except TypeError as exc:
            raise UserError(f"env {spec!r} could not be made with env_kwargs {kwargs}: {exc}") from exc
        missing = [m for m in ("reset", "step") if not callable(getattr(env, m, None))]
        if missing:
            raise UserError(f"env {spec!r} has no {' and no '.join(missing)} method; a text environment has "
                            "gymnasium's reset(seed=..., options=...) and step(action) with text observations")
        return env
    return make


def env_class(spec: str) -> Callable:
    """What ``spec`` names: a shipped rendering's constructor, or the class of ``module:Class`` or
    ``file.py:Class``."""
    if spec in RENDERED:
        return RENDERED[spec]
    if ":" not in spec:
        raise UserError(f"env {spec!r} has no text rendering; shipped: {', '.join(RENDERED)}, or give your own "
                        "text environment as module:Class or path/to/file.py:Class")
    where, _, attr = spec.rpartition(":")
    if where.endswith(".py"):
        path = Path(where).expanduser()
        if not path.is_file():
            raise UserError(f"env file {where!r} does not exist (from env {spec!r})")
        module_spec = importlib.util.spec_from_file_location(f"rlhf_user_env_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)  # the user pointed at this file explicitly
        except Exception as exc:
            raise UserError(f"importing env file {where!r} failed: {type(exc).__name__}: {exc}") from exc
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as exc:
            raise UserError(f"cannot import module {where!r} for env {spec!r}: {exc}") from exc
    cls = getattr(module, attr, None)
    if not isinstance(cls, type):
        raise UserError(f"{where!r} has no class {attr!r} (from env {spec!r})")
    return cls

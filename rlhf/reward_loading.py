"""What a reward is: the names a recipe gives rewards by, the functions they load, and the call
contract (what a function is called with, what it must return).

A recipe names rewards as a list whose items are a name or a one-key mapping name -> weight:

    rewards: [arith_correct, {arith_format: 0.5}, my_pkg.rewards:fn, ./my_rewards.py:fn]

A name is a short name from the ``rewards`` package, ``module:function`` (imported),
``path/to/file.py:function`` (the user's own file, executed as a module because they pointed
at it, under a module name of its own, so a ``rewards.py`` of yours is never the built-in
package), or ``rm:MODEL`` (a reward model: a directory trained by ``algo: reward_model``, or a
sequence classifier by Hub id or directory, ``rlhf.lm.classifier_reward``). From Python
(``rlhf.train``), a callable can stand wherever a name does.

The call (TRL's GRPOTrainer contract): keywords ``prompts``, ``completions``, ``completion_ids``
(each completion's token ids, its end token included), ``trainer_state`` and every dataset
column. A function with ``**kwargs`` gets all of them; one without gets only those it names (and
``completions_ids``, the spelling of TRL's documentation, when it names that). It returns one
finite number (or None: "not applicable") per completion.

A function may name the optional packages it imports as ``fn.requires`` (module names, e.g.
``("math_verify",)``): the preflight checks them before a run directory exists.
"""
from __future__ import annotations

import ast
import difflib
import functools
import hashlib
import importlib
import importlib.util
import inspect
import math
import sys
from numbers import Real
from pathlib import Path
from typing import Callable

from rlhf.errors import UserError

CALLABLE_PREFIX = "callable:"  # a recipe.yaml's name for a callable given to rlhf.train
USER_MODULE_PREFIX = "rlhf_user_reward_"  # the module names of files named as path/to/file.py:function


# ------------------------------------------------------------------------------ names
def parse_reward_specs(specs) -> list[tuple[str | Callable, float]]:
    """[(name or callable, weight)] from a recipe's (or ``rlhf.train``'s) rewards: each item a name,
    a callable, or a one-key mapping of either to its weight."""
    if isinstance(specs, (str, dict)) or callable(specs):
        specs = [specs]
    out = []
    for spec in specs or []:
        if isinstance(spec, str) or callable(spec):
            out.append((spec, 1.0))
        elif isinstance(spec, dict) and len(spec) == 1:
            (name, weight), = spec.items()
            if not isinstance(weight, Real) or isinstance(weight, bool):
                raise UserError(f"reward weight for {reward_label(name)!r} must be a number, got {weight!r}")
            out.append((name if callable(name) else str(name), float(weight)))
        else:
            raise UserError(f"reward entry {spec!r} must be a name, a function, or a one-key mapping of "
                            "either to its weight")
    if not out:
        raise UserError("the recipe names no reward function; set rewards: [arith_correct] or your own")
    return out


def recipe_rewards(specs) -> list:
    """``specs`` as a recipe.yaml can hold them: each callable replaced by the name that loads it
    (``module:function`` when it is importable from a module, else ``callable:NAME``)."""
    out = []
    for spec, weight in parse_reward_specs(specs):
        name = spec if isinstance(spec, str) else importable_name(spec) or CALLABLE_PREFIX + reward_label(spec)
        out.append(name if weight == 1.0 else {name: weight})
    return out


def reward_label(fn) -> str:
    """A reward's short name: a name as given, a callable's name (a function's, else its class's)."""
    if isinstance(fn, str):
        return fn
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "__name__", None) or type(fn).__name__


def importable_name(fn) -> str | None:
    """``module:function`` that imports ``fn`` itself (a top-level function of an importable
    module), else None (a lambda, a closure, a function of ``__main__`` or a notebook)."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or module == "__main__" or module.startswith(USER_MODULE_PREFIX) or "." in qualname \
            or "<" in qualname:
        return None
    try:
        found = getattr(importlib.import_module(module), qualname, None)
    except Exception:  # noqa: BLE001 - not importable by name: the caller says what to do
        return None
    return f"{module}:{qualname}" if found is fn else None


# ------------------------------------------------------------------------------ loading
def load_reward(name: str) -> Callable:
    """The function a reward name stands for (``rm:`` names: the reward model's scorer)."""
    if name.startswith("rm:"):  # a reward model: ours (trained here) or a sequence classifier
        from rlhf.lm.classifier_reward import load_reward_model  # here: torch loads only for recipes naming one

        return load_reward_model(name[3:])
    if name.startswith(CALLABLE_PREFIX):
        raise UserError(f"reward {name!r} was a Python function given to rlhf.train, which a name cannot load; "
                        f"pass it again (rlhf.evaluate(run_dir, rewards=[...])), or define it in a file and "
                        "name it path/to/file.py:function")
    if ":" not in name:
        return _builtin(name)
    where, _, attr = name.rpartition(":")
    module = _load_file(where, name) if where.endswith(".py") else _import_module(where, attr, name)
    fn = getattr(module, attr, None)
    if not callable(fn):
        builtin = " (module 'rewards' is rlhf's built-in rewards package; name a file of your own as " \
                  f"path/to/file.py:{attr})" if where.split(".")[0] == "rewards" else ""
        raise UserError(f"{where!r} has no function {attr!r} (from reward {name!r}){builtin}")
    return fn


def _builtin(name: str) -> Callable:
    """The built-in reward of that short name (``rewards.REGISTRY``)."""
    try:
        from rewards import REGISTRY
    except ImportError as exc:  # python -m / a script run where a rewards.py of the user's comes first
        found = getattr(sys.modules.get("rewards"), "__file__", None)
        raise UserError(f"module 'rewards' here is {found!r}, not rlhf's built-in rewards package ({exc}); run "
                        "the `rlhf` command (it does not import from the working directory) or rename your "
                        "file, and name it as path/to/file.py:function") from None
    if name in REGISTRY:
        return REGISTRY[name]
    close = difflib.get_close_matches(name, REGISTRY, n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise UserError(f"unknown reward {name!r}; {hint}built-ins are {sorted(REGISTRY)}, or use "
                    "module:function or path/to/file.py:function")


def _load_file(where: str, name: str):
    """The user's file ``where``, executed as a module named after its resolved path: two files
    of the same name (and a ``rewards.py`` beside the built-in ``rewards`` package) never meet."""
    path = Path(where).expanduser()
    if not path.is_file():
        raise UserError(f"reward file {where!r} does not exist (from reward {name!r})")
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
    module_name = f"{USER_MODULE_PREFIX}{path.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # what dataclasses and pickle look a module's names up in
    try:
        spec.loader.exec_module(module)  # the user pointed at this file explicitly
    except Exception as exc:
        sys.modules.pop(module_name, None)
        raise UserError(f"importing reward file {where!r} failed: {type(exc).__name__}: {exc}") from exc
    return module


def _import_module(where: str, attr: str, name: str):
    """Module ``where`` imported; refused in one sentence where a file of that name in the working
    directory defines ``attr`` but the import finds another module (the built-in ``rewards``
    package, the standard library): a path names the user's file unambiguously."""
    local = _local_source(where)
    try:
        module = importlib.import_module(where)
    except ImportError as exc:
        hint = f"; to load the file {local} name it {local}:{attr}" if local else ""
        raise UserError(f"cannot import module {where!r} for reward {name!r}: {exc}{hint}") from exc
    found = getattr(module, "__file__", None)
    if local and (found is None or Path(found).resolve() != (Path.cwd() / local).resolve()) \
            and (_defines(Path(local), attr) or not callable(getattr(module, attr, None))):
        raise UserError(f"reward {name!r} names module {where!r}, which imports {found or 'a built-in module'}, "
                        f"not {local} in the working directory; name your file as {local}:{attr}")
    return module


def _local_source(where: str) -> str | None:
    """The file in the working directory that module ``where`` would be if it came first on the path."""
    base = Path(*where.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if (Path.cwd() / candidate).is_file():
            return candidate.as_posix()
    return None


def _defines(path: Path, attr: str) -> bool:
    """Whether ``path`` binds ``attr`` at its top level (read, not run; unreadable: assume it does)."""
    try:
        tree = ast.parse(path.read_text())
    except (OSError, SyntaxError, ValueError):
        return True
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == attr:
            return True
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and any(
                isinstance(t, ast.Name) and t.id == attr
                for t in (node.targets if isinstance(node, ast.Assign) else [node.target])):
            return True
        if isinstance(node, (ast.Import, ast.ImportFrom)) and any(
                (a.asname or a.name.split(".")[0]) == attr for a in node.names):
            return True
    return False


# ------------------------------------------------------------------------------ the call
def is_async_callable(fn) -> bool:
    """Whether calling ``fn`` returns a coroutine: an ``async def`` function, a partial of one, or
    an object whose ``__call__`` is one."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


# what every reward receives besides the dataset's columns (``score``; completions_ids: TRL's
# documented spelling of completion_ids); the preflight checks the other parameters against the data
GIVEN = ("prompts", "completions", "completion_ids", "completions_ids", "trainer_state")


def reward_kwargs(fn, available: dict) -> dict:
    """What ``fn`` is called with: everything in ``available`` when it takes ``**kwargs`` (or its
    signature cannot be read), else the keywords it names; ``completions_ids`` (TRL's documented
    spelling of ``completion_ids``) only to a function that names it."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = None
    if params is None or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        out = dict(available)
    else:
        out = {k: v for k, v in available.items() if k in params}
    if params is not None and "completions_ids" in params and "completion_ids" in available:
        out["completions_ids"] = available["completion_ids"]
    return out


def one_sample(prompts, completions, available: dict, i: int) -> dict:
    """The call's keywords for sample ``i`` alone (every list column cut to its row)."""
    return {"prompts": prompts[i:i + 1], "completions": completions[i:i + 1],
            **{k: v[i:i + 1] if isinstance(v, list) else v for k, v in available.items()}}


def check_values(name: str, values, completions, first: int = 0) -> list[float | None]:
    """Validate what function ``name`` returned for ``completions`` (samples ``first``, ``first + 1``, ...)."""
    import torch  # here: reward worker processes import this module and start without torch

    if not isinstance(values, (list, tuple)) and not torch.is_tensor(values):
        raise UserError(f"reward function {name!r} returned {type(values).__name__}; it must "
                        f"return a list of {len(completions)} floats (or None)")
    values = values.tolist() if torch.is_tensor(values) else list(values)
    if len(values) != len(completions):
        raise UserError(f"reward function {name!r} returned {len(values)} values for "
                        f"{len(completions)} completions; it must return one per completion")
    for i, v in enumerate(values):
        if v is not None and (not isinstance(v, Real) or not math.isfinite(v)):
            raise UserError(f"reward function {name!r} returned {v!r} for sample {first + i} "
                            f"(completion {short_completion(completions[i])}); rewards must be finite numbers "
                            "or None")
    return [None if v is None else float(v) for v in values]


def short_completion(completion) -> str:
    """A completion as messages quote it: its first 80 characters, repr'd."""
    text = completion if isinstance(completion, str) else str(completion)
    return repr(text[:80] + ("..." if len(text) > 80 else ""))


def report_late(name: str, timeout_s: float, late: list[int], completions) -> None:
    """The one line saying that samples ``late`` of function ``name`` ran past the timeout."""
    more = f" and {len(late) - 1} other sample(s) of this batch" if len(late) > 1 else ""
    print(f"reward function {name!r} ran past reward_timeout_s={timeout_s:g} on sample {late[0]} "
          f"(completion {short_completion(completions[late[0]])}){more}; they score None (nothing added) and "
          "the run goes on: raise reward_timeout_s or make the function faster", file=sys.stderr, flush=True)

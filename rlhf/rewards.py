"""Loading reward functions named in a recipe and scoring completions with them.

A recipe names rewards as a list whose items are a name or a one-key mapping name -> weight:

    rewards: [arith_correct, {arith_format: 0.5}, my_pkg.rewards:fn, ./my_rewards.py:fn]

A name is a short name from the ``rewards`` package, ``module:function`` (imported),
``path/to/file.py:function`` (the user's own file, executed as a module because they pointed
at it), or ``rm:DIR`` (a reward model trained by ``algo: reward_model``). The total reward is the weighted sum; ``None`` from a function means "not
applicable" and contributes nothing.
"""
from __future__ import annotations

import difflib
import importlib
import importlib.util
import math
from dataclasses import dataclass
from numbers import Real
from pathlib import Path
from typing import Callable

import torch

from rlhf.errors import UserError


@dataclass
class RewardFn:
    name: str
    fn: Callable
    weight: float = 1.0


def parse_reward_specs(specs) -> list[tuple[str, float]]:
    if isinstance(specs, (str, dict)):
        specs = [specs]
    out = []
    for spec in specs or []:
        if isinstance(spec, str):
            out.append((spec, 1.0))
        elif isinstance(spec, dict) and len(spec) == 1:
            (name, weight), = spec.items()
            if not isinstance(weight, Real):
                raise UserError(f"reward weight for {name!r} must be a number, got {weight!r}")
            out.append((str(name), float(weight)))
        else:
            raise UserError(f"reward entry {spec!r} must be a name or a one-key mapping name: weight")
    if not out:
        raise UserError("the recipe names no reward function; set rewards: [arith_correct] or your own")
    return out


def load_rewards(specs) -> list[RewardFn]:
    return [RewardFn(name, load_reward(name), w) for name, w in parse_reward_specs(specs)]


def load_reward(name: str) -> Callable:
    from rewards import REGISTRY

    if name in REGISTRY:
        return REGISTRY[name]
    if name.startswith("rm:"):  # a trained reward model directory
        from rlhf.lm.reward_model import RewardModelFn  # here: peft loads only for recipes that name one

        return RewardModelFn(name[3:])
    if ":" not in name:
        close = difflib.get_close_matches(name, REGISTRY, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UserError(f"unknown reward {name!r}; {hint}built-ins are {sorted(REGISTRY)}, or use "
                        "module:function or path/to/file.py:function")
    where, _, attr = name.rpartition(":")
    if where.endswith(".py"):
        path = Path(where).expanduser()
        if not path.is_file():
            raise UserError(f"reward file {where!r} does not exist (from reward {name!r})")
        spec = importlib.util.spec_from_file_location(f"rlhf_user_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)  # the user pointed at this file explicitly
        except Exception as exc:
            raise UserError(f"importing reward file {where!r} failed: {type(exc).__name__}: {exc}") from exc
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as exc:
            raise UserError(f"cannot import module {where!r} for reward {name!r}: {exc}") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"{where!r} has no function {attr!r} (from reward {name!r})")
    return fn


def score(reward_fns: list[RewardFn], prompts: list, completions: list, columns: dict[str, list]
          ) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted sum of all reward functions, shape [N]; plus the mean of each one for logging."""
    total = torch.zeros(len(completions))
    means = {}
    for rf in reward_fns:
        values = _call(rf, prompts, completions, columns)
        present = [v for v in values if v is not None]
        means[rf.name] = sum(present) / len(present) if present else float("nan")
        total += torch.tensor([0.0 if v is None else rf.weight * v for v in values])
    return total, means


def _call(rf: RewardFn, prompts, completions, columns) -> list[float | None]:
    try:
        values = rf.fn(prompts=prompts, completions=completions, **columns)
    except Exception as exc:
        bad = _first_failing_sample(rf, prompts, completions, columns)
        raise UserError(f"reward function {rf.name!r} raised {type(exc).__name__}: {exc}"
                        f"{bad}; fix the function or make it return None for samples it cannot score"
                        ) from exc
    if not isinstance(values, (list, tuple)) and not torch.is_tensor(values):
        raise UserError(f"reward function {rf.name!r} returned {type(values).__name__}; it must "
                        f"return a list of {len(completions)} floats (or None)")
    values = values.tolist() if torch.is_tensor(values) else list(values)
    if len(values) != len(completions):
        raise UserError(f"reward function {rf.name!r} returned {len(values)} values for "
                        f"{len(completions)} completions; it must return one per completion")
    for i, v in enumerate(values):
        if v is not None and (not isinstance(v, Real) or not math.isfinite(v)):
            raise UserError(f"reward function {rf.name!r} returned {v!r} for sample {i} "
                            f"(completion {_short(completions[i])}); rewards must be finite numbers or None")
    return [None if v is None else float(v) for v in values]


def _first_failing_sample(rf, prompts, completions, columns) -> str:
    for i in range(len(completions)):
        try:
            rf.fn(prompts=prompts[i:i + 1], completions=completions[i:i + 1],
                  **{k: v[i:i + 1] for k, v in columns.items()})
        except Exception:
            return f" on sample {i} (completion {_short(completions[i])})"
    return ""


def _short(completion) -> str:
    text = completion if isinstance(completion, str) else str(completion)
    return repr(text[:80] + ("..." if len(text) > 80 else ""))

"""Loading the reward functions a recipe names and scoring completions with them.

Names, the call contract and what a function must return are ``rlhf.reward_loading``'s; worker
processes and the event loop are ``rlhf.reward_pool``'s. The total reward is the weighted sum;
``None`` from a function means "not applicable" and contributes nothing.

``async def`` functions (or any whose call returns an awaitable) run on one event loop in a daemon
thread, all of a batch's concurrently (``asyncio.gather``).

Guarding (``reward_timeout_s``, ``reward_workers``): with either set, every function except ``rm:``
rewards scores in worker processes (``RewardPool``), one call per sample, so a sample that runs past
the timeout is stopped: it scores None for that function (adds nothing), one sentence names the
function and the sample, and the run goes on. A function whose value for a sample depends on the
other samples of the batch must keep both keys at 0 (the default: one call on the whole batch, in
the trainer's process). Async functions never go to workers: under ``reward_timeout_s`` they are
called once per sample, all samples and functions concurrently on the event loop, each call
cancelled at the timeout (scoring None, with the same sentence).
"""
from __future__ import annotations

import asyncio
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from rlhf.errors import UserError
from rlhf.reward_loading import (CALLABLE_PREFIX, GIVEN, check_values, importable_name, is_async_callable,
                                 load_reward, one_sample, parse_reward_specs, recipe_rewards, report_late,
                                 reward_kwargs, reward_label, short_completion)
from rlhf.reward_pool import RewardPool, run_async

if TYPE_CHECKING:  # torch is imported where it is used
    import torch

__all__ = ["CALLABLE_PREFIX", "GIVEN", "LOOP_GRACE_S", "RewardFn", "RewardPool", "TrainerState", "importable_name",
           "load_reward", "load_rewards", "parse_reward_specs", "recipe_rewards", "reward_kwargs", "reward_label",
           "score"]


LOOP_GRACE_S = 30.0  # past twice the timeout plus this, an async reward is taken to block the loop


@dataclass
class RewardFn:
    name: str
    fn: Callable
    weight: float = 1.0
    pool: RewardPool | None = None  # scores in worker processes when set
    ref: str | None = None          # the name a worker process loads it by (None: it cannot)
    timeout_s: float = 0.0          # async functions: each sample's call is cancelled after this

    @property
    def is_async(self) -> bool:
        return is_async_callable(self.fn)


@dataclass
class TrainerState:
    """What reward functions get as ``trainer_state`` (the fields of TRL's ``TrainerState`` that
    have a meaning here): ``global_step`` the rollouts (steps) done before the one being scored,
    ``max_steps`` the run's ``steps``."""

    global_step: int = 0
    max_steps: int = 0


def load_rewards(specs, timeout_s: float = 0, workers: int = 0) -> list[RewardFn]:
    """The reward functions of a recipe; with ``timeout_s`` or ``workers`` set, the synchronous
    ones but ``rm:`` rewards score in ``max(workers, 1)`` worker processes, each sample stopped
    after ``timeout_s``; async ones stay on the event loop, each sample cancelled after ``timeout_s``."""
    fns, seen = [], set()
    for spec, w in parse_reward_specs(specs):
        if isinstance(spec, str):
            fn, name, ref = load_reward(spec), spec, spec
        else:
            fn, name, ref = spec, reward_label(spec), importable_name(spec)
        base, k = name, 2
        while name in seen:  # two lambdas: two names in the logged means
            name, k = f"{base}_{k}", k + 1
        seen.add(name)
        fns.append(RewardFn(name, fn, w, ref=ref, timeout_s=timeout_s))
    if timeout_s or workers:
        guarded = [rf for rf in fns if not rf.name.startswith("rm:") and not rf.is_async]  # a model stays here
        for rf in guarded:
            if rf.ref is None:
                raise UserError(f"reward {rf.name!r} is a function worker processes cannot import (defined in "
                                "a notebook, a script or a lambda); with reward_timeout_s or reward_workers set, "
                                "define it in a file and give it as path/to/file.py:function, or make it async "
                                "def, or set both keys to 0")
        if guarded:
            pool = RewardPool(max(workers, 1), timeout_s or None, sorted({rf.ref for rf in guarded}))
            for rf in guarded:
                rf.pool = pool
    return fns


def score(reward_fns: list[RewardFn], prompts: list, completions: list, columns: dict[str, list],
          completion_ids: list[list[int]] | None = None, trainer_state: TrainerState | None = None,
          values_out: dict | None = None) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
    """Weighted sum of all reward functions, shape [N]; the mean of each one for logging (and,
    for functions under a timeout, ``NAME/timeouts``: the fraction of samples stopped); and
    ``scored`` [N] bool, False where every function returned None (or timed out). Such a row
    scores 0 here but has no reward: trainers give it advantage 0 and leave it out of the batch
    statistics (TRL does the same); ``all_none`` in the means is the fraction of such rows.
    ``completion_ids``: each completion's token ids (None: not known, e.g. completions given as
    text); ``trainer_state``: default ``TrainerState()``.
    ``values_out``: filled with each function's own values (unweighted, None: unscored)."""
    import torch

    available = {**columns, "trainer_state": trainer_state or TrainerState()}
    if completion_ids is not None:
        available["completion_ids"] = completion_ids
    total = torch.zeros(len(completions))
    scored = torch.zeros(len(completions), dtype=torch.bool)
    means = {}
    results = _score_in_process([rf for rf in reward_fns if rf.pool is None], prompts, completions, available)
    for rf in reward_fns:
        if rf.pool is not None:
            values, late = rf.pool.score(rf.ref, prompts, completions, available, label=rf.name)
        else:
            values, late = results[rf.name]
        if late is not None:
            means[f"{rf.name}/timeouts"] = len(late) / max(len(completions), 1)
        if values_out is not None:
            values_out[rf.name] = values
        present = [v for v in values if v is not None]
        means[rf.name] = sum(present) / len(present) if present else float("nan")
        total += torch.tensor([0.0 if v is None else rf.weight * v for v in values])
        scored |= torch.tensor([v is not None for v in values], dtype=torch.bool)
    means["all_none"] = float((~scored).float().mean()) if len(completions) else 0.0
    return total, means, scored


def _score_in_process(fns: list[RewardFn], prompts, completions, available: dict) -> dict:
    """name -> (values, indices stopped by the timeout or None when there is none), for the
    functions scored in this process: synchronous ones one after the other, then every
    awaitable at once on the event loop (an async function under a timeout: one per sample)."""
    results, pending = {}, []  # pending: (function, sample index or None for the batch, awaitable)
    try:
        for rf in fns:
            if rf.is_async and rf.timeout_s:
                pending += [(rf, i, asyncio.wait_for(_invoke(rf, prompts, completions, available, i), rf.timeout_s))
                            for i in range(len(completions))]
                continue
            try:
                out = rf.fn(**reward_kwargs(rf.fn, {"prompts": prompts, "completions": completions, **available}))
            except UserError:  # already one sentence for the user (e.g. a missing package)
                raise
            except Exception as exc:
                raise _failed(rf, exc, prompts, completions, available) from exc
            if inspect.isawaitable(out):
                pending.append((rf, None, out))
            else:
                results[rf.name] = (check_values(rf.name, out, completions), None)
    except BaseException:
        for _, _, aw in pending:  # never awaited: closed, so Python does not warn about them
            getattr(aw, "close", lambda: None)()
        raise
    if pending:
        results.update(_await_all(pending, prompts, completions, available))
    return results


def _await_all(pending: list, prompts, completions, available: dict) -> dict:
    """The awaitables of ``_score_in_process`` gathered on the event loop: name -> (values, late)."""
    timed = {rf.name: rf for rf, i, _ in pending if i is not None}  # the per-sample (timed) functions
    outs = run_async(_gather([aw for _, _, aw in pending]),
                     2 * max(rf.timeout_s for rf in timed.values()) + LOOP_GRACE_S if timed else None)
    results = {name: ([None] * len(completions), []) for name in timed}
    for (rf, i, _), out in zip(pending, outs):
        if isinstance(out, asyncio.TimeoutError) and i is not None:
            results[rf.name][1].append(i)
        elif isinstance(out, UserError):
            raise out
        elif isinstance(out, BaseException):
            where = f" on sample {i} (completion {short_completion(completions[i])})" if i is not None else None
            raise _failed(rf, out, prompts, completions, available, where) from out
        elif i is None:
            results[rf.name] = (check_values(rf.name, out, completions), None)
        else:
            results[rf.name][0][i] = check_values(rf.name, out, [completions[i]], i)[0]
    for name, rf in timed.items():
        if results[name][1]:
            report_late(name, rf.timeout_s, results[name][1], completions)
    return results


async def _invoke(rf: RewardFn, prompts, completions, available: dict, i: int):
    """``rf`` on sample ``i`` alone (awaited when it is async)."""
    out = rf.fn(**reward_kwargs(rf.fn, one_sample(prompts, completions, available, i)))
    return await out if inspect.isawaitable(out) else out


async def _gather(awaitables: list):
    return await asyncio.gather(*awaitables, return_exceptions=True)


def _failed(rf: RewardFn, exc: BaseException, prompts, completions, available, where: str | None = None
            ) -> UserError:
    where = _first_failing_sample(rf, prompts, completions, available) if where is None else where
    return UserError(f"reward function {rf.name!r} raised {type(exc).__name__}: {exc}{where}; fix the "
                     "function or make it return None for samples it cannot score")


def _first_failing_sample(rf, prompts, completions, available) -> str:
    for i in range(len(completions)):
        try:
            run_async(_invoke(rf, prompts, completions, available, i))
        except Exception:
            return f" on sample {i} (completion {short_completion(completions[i])})"
    return ""

"""Loading reward functions named in a recipe and scoring completions with them.

A recipe names rewards as a list whose items are a name or a one-key mapping name -> weight:

    rewards: [arith_correct, {arith_format: 0.5}, my_pkg.rewards:fn, ./my_rewards.py:fn]

A name is a short name from the ``rewards`` package, ``module:function`` (imported),
``path/to/file.py:function`` (the user's own file, executed as a module because they pointed
at it), or ``rm:MODEL`` (a reward model: a directory trained by ``algo: reward_model``, or a
sequence classifier by Hub id or directory, ``rlhf.lm.classifier_reward``). From Python
(``rlhf.train``), a callable can stand wherever a name does. The total reward is the weighted sum;
``None`` from a function means "not applicable" and contributes nothing.

The call (TRL's GRPOTrainer contract): keywords ``prompts``, ``completions``, ``completion_ids``
(each completion's token ids, its end token included), ``trainer_state`` (``TrainerState``:
``global_step``, the rollouts done before this one, and ``max_steps``) and every dataset column.
A function with ``**kwargs`` gets all of them; one without gets only those it names (and
``completions_ids``, the spelling of TRL's documentation, when it names that). ``async def``
functions (or any whose call returns an awaitable) run on one event loop in a daemon thread,
all of a batch's concurrently (``asyncio.gather``).

Guarding (``reward_timeout_s``, ``reward_workers``): with either set, every function except ``rm:``
rewards scores in worker processes (fresh interpreters, never forks of the trainer), one call per
sample, so a sample that runs past the timeout can be stopped by killing its worker: it scores
None for that function (adds nothing), one sentence names the function and the sample, and the run
goes on. A function whose value for a sample depends on the other samples of the batch must keep
both keys at 0 (the default: one call on the whole batch, in the trainer's process).
Async functions never go to workers: under ``reward_timeout_s`` they are called once per sample,
all samples and functions concurrently on the event loop, each call cancelled at the timeout
(scoring None, with the same sentence).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import difflib
import functools
import importlib
import importlib.util
import inspect
import math
import os
import signal
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from numbers import Real
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from rlhf.errors import UserError

if TYPE_CHECKING:  # torch is imported where it is used: reward worker processes start without it
    import torch

# torch is imported inside the functions that need it: reward worker processes import this module
# and should start in a fraction of a second


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


CALLABLE_PREFIX = "callable:"  # a recipe.yaml's name for a callable given to rlhf.train


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
                raise UserError(f"reward weight for {_label(name)!r} must be a number, got {weight!r}")
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
        name = spec if isinstance(spec, str) else importable_name(spec) or CALLABLE_PREFIX + _label(spec)
        out.append(name if weight == 1.0 else {name: weight})
    return out


def load_rewards(specs, timeout_s: float = 0, workers: int = 0) -> list[RewardFn]:
    """The reward functions of a recipe; with ``timeout_s`` or ``workers`` set, the synchronous
    ones but ``rm:`` rewards score in ``max(workers, 1)`` worker processes, each sample stopped
    after ``timeout_s``; async ones stay on the event loop, each sample cancelled after ``timeout_s``."""
    fns, seen = [], set()
    for spec, w in parse_reward_specs(specs):
        if isinstance(spec, str):
            fn, name, ref = load_reward(spec), spec, spec
        else:
            fn, name, ref = spec, _label(spec), importable_name(spec)
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


def load_reward(name: str) -> Callable:
    from rewards import REGISTRY

    if name in REGISTRY:
        return REGISTRY[name]
    if name.startswith("rm:"):  # a reward model: ours (trained here) or a sequence classifier
        from rlhf.lm.classifier_reward import load_reward_model  # here: torch loads only for recipes naming one

        return load_reward_model(name[3:])
    if name.startswith(CALLABLE_PREFIX):
        raise UserError(f"reward {name!r} was a Python function given to rlhf.train, which a name cannot load; "
                        f"pass it again (rlhf.evaluate(run_dir, rewards=[...])), or define it in a file and "
                        "name it path/to/file.py:function")
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


def _label(fn) -> str:
    """A callable's short name (a function's, else its class's)."""
    if isinstance(fn, str):
        return fn
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "__name__", None) or type(fn).__name__


def importable_name(fn) -> str | None:
    """``module:function`` that imports ``fn`` itself (a top-level function of an importable
    module), else None (a lambda, a closure, a function of ``__main__`` or a notebook)."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or module == "__main__" or module.startswith("rlhf_user_reward_") or "." in qualname \
            or "<" in qualname:
        return None
    try:
        found = getattr(importlib.import_module(module), qualname, None)
    except Exception:  # noqa: BLE001 - not importable by name: the caller says what to do
        return None
    return f"{module}:{qualname}" if found is fn else None


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
                results[rf.name] = (_check(rf, out, completions), None)
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
            where = f" on sample {i} (completion {_short(completions[i])})" if i is not None else None
            raise _failed(rf, out, prompts, completions, available, where) from out
        elif i is None:
            results[rf.name] = (_check(rf, out, completions), None)
        else:
            results[rf.name][0][i] = _check(rf, out, [completions[i]], i)[0]
    for name, rf in timed.items():
        if results[name][1]:
            report_late(name, rf.timeout_s, results[name][1], completions)
    return results


async def _invoke(rf: RewardFn, prompts, completions, available: dict, i: int):
    """``rf`` on sample ``i`` alone (awaited when it is async)."""
    one = {"prompts": prompts[i:i + 1], "completions": completions[i:i + 1],
           **{k: v[i:i + 1] if isinstance(v, list) else v for k, v in available.items()}}
    out = rf.fn(**reward_kwargs(rf.fn, one))
    return await out if inspect.isawaitable(out) else out


async def _finish_and_stop() -> None:
    """Let the loop's other tasks end (the cancelled batch), then stop the loop."""
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    await asyncio.gather(*others, return_exceptions=True)
    asyncio.get_running_loop().stop()


async def _gather(awaitables: list):
    return await asyncio.gather(*awaitables, return_exceptions=True)


def _failed(rf: RewardFn, exc: BaseException, prompts, completions, available, where: str | None = None
            ) -> UserError:
    where = _first_failing_sample(rf, prompts, completions, available) if where is None else where
    return UserError(f"reward function {rf.name!r} raised {type(exc).__name__}: {exc}{where}; fix the "
                     "function or make it return None for samples it cannot score")


LOOP_GRACE_S = 30.0  # past twice the timeout plus this, an async reward is taken to block the loop
_LOOP: tuple[asyncio.AbstractEventLoop, threading.Thread] | None = None
_LOOP_LOCK = threading.Lock()


def run_async(coro, timeout: float | None = None):
    """Run ``coro`` on the rewards' event loop, which lives in a daemon thread (so that async
    rewards work where a loop already runs, as in a notebook, and keep their clients across
    steps), and return its result."""
    global _LOOP
    with _LOOP_LOCK:
        if _LOOP is None or not _LOOP[1].is_alive():
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="rlhf-rewards", daemon=True)
            thread.start()
            _LOOP = (loop, thread)
    future = asyncio.run_coroutine_threadsafe(coro, _LOOP[0])
    try:
        return future.result(timeout)
    except concurrent.futures.TimeoutError:  # wait_for never fired: a call computes instead of awaiting
        future.cancel()
        stuck, _LOOP = _LOOP[0], None  # the next batch gets a fresh loop; this one stops once unblocked
        asyncio.run_coroutine_threadsafe(_finish_and_stop(), stuck)
        raise UserError(f"an async reward function blocked the event loop past {timeout:g} s (reward_timeout_s "
                        "cannot stop a call that never awaits); make it await its slow work (e.g. "
                        "asyncio.to_thread), or write it as a plain def to have it stopped in a worker "
                        "process") from None
    except BaseException:  # Ctrl-C while waiting: stop the batch's calls
        future.cancel()
        raise


def _check(rf: RewardFn, values, completions, first: int = 0) -> list[float | None]:
    """Validate what a function returned for ``completions`` (samples ``first``, ``first + 1``, ...)."""
    import torch

    if not isinstance(values, (list, tuple)) and not torch.is_tensor(values):
        raise UserError(f"reward function {rf.name!r} returned {type(values).__name__}; it must "
                        f"return a list of {len(completions)} floats (or None)")
    values = values.tolist() if torch.is_tensor(values) else list(values)
    if len(values) != len(completions):
        raise UserError(f"reward function {rf.name!r} returned {len(values)} values for "
                        f"{len(completions)} completions; it must return one per completion")
    for i, v in enumerate(values):
        if v is not None and (not isinstance(v, Real) or not math.isfinite(v)):
            raise UserError(f"reward function {rf.name!r} returned {v!r} for sample {first + i} "
                            f"(completion {_short(completions[i])}); rewards must be finite numbers or None")
    return [None if v is None else float(v) for v in values]


def _first_failing_sample(rf, prompts, completions, available) -> str:
    for i in range(len(completions)):
        try:
            run_async(_invoke(rf, prompts, completions, available, i))
        except Exception:
            return f" on sample {i} (completion {_short(completions[i])})"
    return ""


def _short(completion) -> str:
    text = completion if isinstance(completion, str) else str(completion)
    return repr(text[:80] + ("..." if len(text) > 80 else ""))


def report_late(name: str, timeout_s: float, late: list[int], completions) -> None:
    """The one line saying that samples ``late`` of function ``name`` ran past the timeout."""
    more = f" and {len(late) - 1} other sample(s) of this batch" if len(late) > 1 else ""
    print(f"reward function {name!r} ran past reward_timeout_s={timeout_s:g} on sample {late[0]} "
          f"(completion {_short(completions[late[0]])}){more}; they score None (nothing added) and the "
          "run goes on: raise reward_timeout_s or make the function faster", file=sys.stderr, flush=True)


_STARTUP_S = 300  # a worker's interpreter start and function imports (not a sample's time)


class RewardPool:
    """``workers`` interpreter processes that score one sample per call, each call stopped after
    ``timeout_s`` by killing its worker (a thread cannot be stopped), which is then replaced.
    Workers are fresh interpreters (not forks: the trainer's torch threads are not copied) that load
    the functions by name with ``load_reward``, so a reward must be a built-in, ``module:function``
    or ``file.py:function``; they die with the trainer (PR_SET_PDEATHSIG) or when it closes the pool."""

    def __init__(self, workers: int, timeout_s: float | None, names: list[str]):
        self.timeout_s, self.names = timeout_s, names
        self.workers: list[_Worker | None] = [None] * workers
        weakref.finalize(self, _stop_all, self.workers)

    def score(self, ref: str, prompts, completions, available, label: str | None = None
              ) -> tuple[list[float | None], list[int] | None]:
        """One value per completion of the function loaded as ``ref`` (None where it timed out)
        and the indices that timed out (None without a timeout); ``label`` names it in messages."""
        name = label or ref
        todo = list(range(len(completions)))[::-1]
        values: list = [None] * len(completions)
        late: list[int] = []
        busy: dict[int, tuple[int, float]] = {}  # worker slot -> (sample, deadline)
        self._start_missing()
        try:
            while todo or busy:
                for k in range(len(self.workers)):
                    if todo and k not in busy:
                        i = todo.pop()
                        self._send(k, (ref, {"prompts": prompts[i:i + 1], "completions": completions[i:i + 1],
                                             **{c: v[i:i + 1] if isinstance(v, list) else v
                                                for c, v in available.items()}}))
                        busy[k] = (i, time.monotonic() + (self.timeout_s or math.inf))
                left = min(d for _, d in busy.values()) - time.monotonic()
                ready = wait([self.workers[k].recv for k in busy], None if left == math.inf else max(left, 0))
                for k in [k for k in busy if self.workers[k].recv in ready]:
                    i, _ = busy.pop(k)
                    values[i] = self._receive(k, name, i, completions[i])
                for k in [k for k, (_, d) in busy.items() if d <= time.monotonic()]:
                    i, _ = busy.pop(k)
                    self._stop(k)
                    late.append(i)
        except BaseException:  # a failed sample or Ctrl-C: drop the workers whose replies are pending
            for k in busy:
                self._stop(k)
            raise
        if late:
            report_late(name, self.timeout_s, sorted(late), completions)
        return values, sorted(late) if self.timeout_s else None

    def _start_missing(self) -> None:
        """Start the workers not running and wait until each has loaded the functions: startup is
        not counted in a sample's time."""
        new = [k for k, w in enumerate(self.workers) if w is None]
        for k in new:
            self.workers[k] = _Worker(self.names)
        for k in new:
            w = self.workers[k]
            if not wait([w.recv], _STARTUP_S):
                self._stop(k)
                raise UserError(f"a reward worker process did not load {self.names} within {_STARTUP_S} s; "
                                "check that the reward functions import quickly (or set reward_workers: 0 "
                                "and reward_timeout_s: 0)")
            try:
                status, payload = w.recv.recv()
            except (EOFError, OSError):
                status, payload = "error", f"the worker exited with status {w.proc.wait()}"
            if status != "ready":
                self._stop(k)
                raise UserError(f"a reward worker process could not load {self.names}: {payload}")

    def _send(self, k: int, task) -> None:
        if self.workers[k] is None:
            self._start_missing()
        self.workers[k].send.send(task)

    def _receive(self, k: int, name: str, i: int, completion) -> float | None:
        try:
            status, payload = self.workers[k].recv.recv()
        except (EOFError, OSError):
            code = self.workers[k].proc.wait()
            self._stop(k)
            raise UserError(f"reward function {name!r} killed its worker process (exit status {code}) on sample "
                            f"{i} (completion {_short(completion)}); fix the function") from None
        if status == "error":
            raise UserError(f"reward function {name!r} raised {payload} on sample {i} (completion "
                            f"{_short(completion)}); fix the function or make it return None for samples "
                            "it cannot score")
        return _check(RewardFn(name, None), payload, [completion], first=i)[0]

    def _stop(self, k: int) -> None:
        if self.workers[k] is not None:
            self.workers[k].stop()
            self.workers[k] = None

    def close(self) -> None:
        _stop_all(self.workers)


def _stop_all(workers: list) -> None:
    for k, w in enumerate(workers):
        if w is not None:
            w.stop()
            workers[k] = None


class _Worker:
    """One reward worker: a fresh interpreter, fed pickled (name, kwargs) tasks over a pipe."""

    def __init__(self, names: list[str]):
        to_child, from_parent = os.pipe()[::-1]
        from_child, to_parent = os.pipe()
        path = os.pathsep.join(os.path.abspath(p) for p in sys.path if p)  # import exactly what we import
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "import sys; from rlhf.rewards import _worker_main; "
             "_worker_main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:])", str(from_parent), str(to_parent),
             *names],
            pass_fds=(from_parent, to_parent), stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
        os.close(from_parent)
        os.close(to_parent)
        self.send, self.recv = Connection(to_child, readable=False), Connection(from_child, writable=False)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.send.close()
        self.recv.close()


def _worker_main(read_fd: int, write_fd: int, names: list[str]) -> None:
    """A reward worker's loop: load each named function once, score one sample per task."""
    try:  # die with the trainer (Linux)
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle; it stops us
    os.dup2(2, 1)  # a print() in a reward goes to stderr, never into the result pipe
    inbox, outbox = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    try:
        fns = {name: load_reward(name) for name in names}
    except Exception as exc:  # noqa: BLE001 - the trainer reports it
        outbox.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    outbox.send(("ready", None))
    loop = None
    while True:
        try:
            name, kwargs = inbox.recv()
        except EOFError:
            return
        try:
            out = fns[name](**reward_kwargs(fns[name], kwargs))
            if inspect.isawaitable(out):  # (a plain def that returned a coroutine)
                loop = loop or asyncio.new_event_loop()
                out = loop.run_until_complete(out)
            out = out.tolist() if hasattr(out, "tolist") else list(out)
            if len(out) != 1:
                raise ValueError(f"it returned {len(out)} values for 1 completion")
            outbox.send(("ok", out))
        except Exception as exc:  # noqa: BLE001 - reported to the trainer with the sample
            outbox.send(("error", f"{type(exc).__name__}: {exc}"))

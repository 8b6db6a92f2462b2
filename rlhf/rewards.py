"""Loading reward functions named in a recipe and scoring completions with them.

A recipe names rewards as a list whose items are a name or a one-key mapping name -> weight:

    rewards: [arith_correct, {arith_format: 0.5}, my_pkg.rewards:fn, ./my_rewards.py:fn]

A name is a short name from the ``rewards`` package, ``module:function`` (imported),
``path/to/file.py:function`` (the user's own file, executed as a module because they pointed
at it), or ``rm:DIR`` (a reward model trained by ``algo: reward_model``). The total reward is the weighted sum; ``None`` from a function means "not
applicable" and contributes nothing.

Guarding (``reward_timeout_s``, ``reward_workers``): with either set, every function except ``rm:``
rewards scores in worker processes (fresh interpreters, never forks of the trainer), one call per
sample, so a sample that runs past the timeout can be stopped by killing its worker: it scores
None for that function (adds nothing), one sentence names the function and the sample, and the run
goes on. A function whose value for a sample depends on the other samples of the batch must keep
both keys at 0 (the default: one call on the whole batch, in the trainer's process).
"""
from __future__ import annotations

import difflib
import importlib
import importlib.util
import math
import os
import signal
import subprocess
import sys
import time
import weakref
from dataclasses import dataclass
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


def load_rewards(specs, timeout_s: float = 0, workers: int = 0) -> list[RewardFn]:
    """The reward functions of a recipe; with ``timeout_s`` or ``workers`` set, all but ``rm:``
    rewards score in ``max(workers, 1)`` worker processes, each sample stopped after ``timeout_s``."""
    fns = [RewardFn(name, load_reward(name), w) for name, w in parse_reward_specs(specs)]
    if timeout_s or workers:
        guarded = [rf for rf in fns if not rf.name.startswith("rm:")]  # a model forward stays in the trainer
        pool = RewardPool(max(workers, 1), timeout_s or None, [rf.name for rf in guarded])
        for rf in guarded:
            rf.pool = pool
    return fns


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


def score(reward_fns: list[RewardFn], prompts: list, completions: list, columns: dict[str, list],
          values_out: dict | None = None) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
    """Weighted sum of all reward functions, shape [N]; the mean of each one for logging (and,
    for functions under a timeout, ``NAME/timeouts``: the fraction of samples stopped); and
    ``scored`` [N] bool, False where every function returned None (or timed out). Such a row
    scores 0 here but has no reward: trainers give it advantage 0 and leave it out of the batch
    statistics (TRL does the same); ``all_none`` in the means is the fraction of such rows.
    ``values_out``: filled with each function's own values (unweighted, None: unscored)."""
    import torch

    total = torch.zeros(len(completions))
    scored = torch.zeros(len(completions), dtype=torch.bool)
    means = {}
    for rf in reward_fns:
        if rf.pool is not None:
            values, late = rf.pool.score(rf.name, prompts, completions, columns)
            if rf.pool.timeout_s:
                means[f"{rf.name}/timeouts"] = len(late) / max(len(completions), 1)
        else:
            values = _call(rf, prompts, completions, columns)
        if values_out is not None:
            values_out[rf.name] = values
        present = [v for v in values if v is not None]
        means[rf.name] = sum(present) / len(present) if present else float("nan")
        total += torch.tensor([0.0 if v is None else rf.weight * v for v in values])
        scored |= torch.tensor([v is not None for v in values], dtype=torch.bool)
    means["all_none"] = float((~scored).float().mean()) if len(completions) else 0.0
    return total, means, scored


def _call(rf: RewardFn, prompts, completions, columns) -> list[float | None]:
    try:
        values = rf.fn(prompts=prompts, completions=completions, **columns)
    except UserError:  # already one sentence for the user (e.g. a missing package)
        raise
    except Exception as exc:
        bad = _first_failing_sample(rf, prompts, completions, columns)
        raise UserError(f"reward function {rf.name!r} raised {type(exc).__name__}: {exc}"
                        f"{bad}; fix the function or make it return None for samples it cannot score"
                        ) from exc
    return _check(rf, values, completions)


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

    def score(self, name: str, prompts, completions, columns) -> tuple[list[float | None], list[int]]:
        """One value per completion (None where it timed out) and the indices that timed out."""
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
                        self._send(k, (name, {"prompts": prompts[i:i + 1], "completions": completions[i:i + 1],
                                              **{c: v[i:i + 1] for c, v in columns.items()}}))
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
            late.sort()
            more = f" and {len(late) - 1} other sample(s) of this batch" if len(late) > 1 else ""
            print(f"reward function {name!r} ran past reward_timeout_s={self.timeout_s:g} on sample {late[0]} "
                  f"(completion {_short(completions[late[0]])}){more}; they score None (nothing added) and the "
                  "run goes on: raise reward_timeout_s or make the function faster", file=sys.stderr, flush=True)
        return values, late

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
    while True:
        try:
            name, kwargs = inbox.recv()
        except EOFError:
            return
        try:
            out = fns[name](**kwargs)
            out = out.tolist() if hasattr(out, "tolist") else list(out)
            if len(out) != 1:
                raise ValueError(f"it returned {len(out)} values for 1 completion")
            outbox.send(("ok", out))
        except Exception as exc:  # noqa: BLE001 - reported to the trainer with the sample
            outbox.send(("error", f"{type(exc).__name__}: {exc}"))

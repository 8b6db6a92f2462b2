"""Where rewards run besides the trainer's own thread: worker processes that can be stopped
(``RewardPool``, used under ``reward_timeout_s`` / ``reward_workers``) and the event loop in a
daemon thread that async rewards run on (``run_async``).

Guarding (``reward_timeout_s``, ``reward_workers``): every function except ``rm:`` rewards scores
in worker processes (fresh interpreters, never forks of the trainer), one call per sample, so a
sample that runs past the timeout can be stopped by killing its worker: it scores None for that
function (adds nothing), one sentence names the function and the sample, and the run goes on.
Async functions never go to workers; they run on the event loop (``rlhf.rewards``).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import math
import os
import signal
import subprocess
import sys
import threading
import time
import weakref
from multiprocessing.connection import Connection, wait

from rlhf.errors import UserError
from rlhf.reward_loading import (check_values, load_reward, one_sample, report_late, reward_kwargs,
                                 short_completion)

# torch is imported inside the functions that need it: reward worker processes import this module
# and should start in a fraction of a second


# ------------------------------------------------------------------------------ the event loop
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


async def _finish_and_stop() -> None:
    """Let the loop's other tasks end (the cancelled batch), then stop the loop."""
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    await asyncio.gather(*others, return_exceptions=True)
    asyncio.get_running_loop().stop()


# ------------------------------------------------------------------------------ worker processes
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
                        self._send(k, (ref, one_sample(prompts, completions, available, i)))
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
                            f"{i} (completion {short_completion(completion)}); fix the function") from None
        if status == "error":
            raise UserError(f"reward function {name!r} raised {payload} on sample {i} (completion "
                            f"{short_completion(completion)}); fix the function or make it return None for samples "
                            "it cannot score")
        return check_values(name, payload, [completion], first=i)[0]

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
            # -c puts the working directory first on sys.path; dropped, or a rewards.py there would
            # be imported as the built-in rewards package
            [sys.executable, "-c", "import sys; sys.path[0] == '' and sys.path.pop(0); "
             "from rlhf.reward_pool import _worker_main; "
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

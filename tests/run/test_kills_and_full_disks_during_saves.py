"""Saves that cannot lose the last good state (rlhf/storage.py, rlhf/checkpoint.py).

The fault-injection test kills a training process at *every* file-system step of a save in
turn -- each directory creation, file creation, fsync, rename, replace, symlink and removal
-- and resumes it; every time the resumed run ends with the metrics and adapter of an
uninterrupted run. The steps are counted by wrapping the ``os`` / ``open`` functions the
save calls, in a child process (``os.fork`` of this one: no second import of torch) that
``os._exit``s -- what SIGKILL does: no cleanup, no buffer flushed -- just before step k.

What a kill between two counted steps can leave that a kill *at* one cannot: a file partly
written inside the unpublished temporary directory (safetensors and torch write in native
code); the temporary is never read, and its removal on resume is what the kills at the
file's own creation and at the next step (its fsync) already check.
"""
from __future__ import annotations

import builtins
import errno
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf.cli import main

ARGS = ["--no-progress", "--set", "steps=2", "--set", "save_every=1", "--set", "threads=1",
        "--set", "prompts_per_step=2", "--set", "group_size=2", "--set", "max_new_tokens=3",
        "--set", "lora_r=2", "--set", "lora_alpha=4", "--set", "lr=0.05",
        "--set", "rewards=[arith_correct, length_penalty]",
        "--set", "keep_checkpoints=1"]  # (one checkpoint: the kills reach the removal of the old one)
KILLED = 137  # the exit status of a process killed by SIGKILL, used by the child's os._exit
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT


def train_argv(tiny_model: str, run: Path) -> list[str]:
    return ["train", "recipes/grpo_arith.yaml", "--run-dir", str(run), *ARGS, "--set", f"model={tiny_model}"]


class Steps:
    """Counts the file-system steps made inside a save (``rlhf.run.publish``) and acts at one:
    ``kill_at=(save, k)`` exits the process before the k-th step of the save-th save;
    ``fail_at``: the same, raising ``OSError(errno)`` instead (a full or read-only disk)."""

    def __init__(self, run_dir: Path, kill_at=None, fail_at=None, fail_errno=errno.ENOSPC):
        self.run_dir, self.kill_at, self.fail_at, self.errno = str(run_dir), kill_at, fail_at, fail_errno
        self.save, self.k, self.inside, self.seen = 0, 0, False, []

    def step(self, op: str, path=None) -> None:
        if not self.inside:
            return
        self.k += 1
        self.seen.append((self.save, self.k, op, os.path.basename(str(path)) if path is not None else ""))
        if (self.save, self.k) == self.kill_at:
            os._exit(KILLED)
        if (self.save, self.k) == self.fail_at:
            raise OSError(self.errno, os.strerror(self.errno), str(path))

    def install(self, monkeypatch) -> None:
        """Wrap the file-system functions (``monkeypatch``: undone after the test). Steps that
        change nothing are not counted (``os.makedirs`` of a directory that exists); a tree
        removal counts twice: before it starts and after its first removal (half removed)."""
        import rlhf.run

        in_rmtree = []

        def counted(name, fn, path_arg=True):
            def wrapper(*a, **kw):
                path = a[0] if path_arg and a else None
                if in_rmtree:
                    if in_rmtree[0]:
                        in_rmtree[0] = False
                        self.step("rmtree-half", path)
                elif not (name == "mkdir" and os.path.isdir(path)):
                    self.step(name, path)
                return fn(*a, **kw)
            return wrapper

        for name in ("mkdir", "rename", "replace", "symlink", "unlink", "rmdir"):
            monkeypatch.setattr(os, name, counted(name, getattr(os, name)))
        monkeypatch.setattr(os, "fsync", counted("fsync", os.fsync, path_arg=False))
        real_rmtree = shutil.rmtree

        def rmtree(path, *a, **kw):
            self.step("rmtree", path)
            in_rmtree.append(True)
            try:
                return real_rmtree(path, *a, **kw)
            finally:
                in_rmtree.clear()
        monkeypatch.setattr(shutil, "rmtree", rmtree)
        real_open, real_os_open = builtins.open, os.open

        def open_(file, mode="r", *a, **kw):
            if isinstance(file, (str, Path)) and set(mode) & set("wax+") and str(file).startswith(self.run_dir):
                self.step("open-" + mode, file)
            return real_open(file, mode, *a, **kw)

        def os_open(path, flags, *a, **kw):
            if flags & WRITE_FLAGS and str(path).startswith(self.run_dir):
                self.step("os.open", path)
            return real_os_open(path, flags, *a, **kw)

        monkeypatch.setattr(builtins, "open", open_)
        monkeypatch.setattr(io, "open", open_)
        monkeypatch.setattr(os, "open", os_open)
        real_publish = rlhf.run.publish

        def publish(*a, **kw):
            self.save, self.k, self.inside = self.save + 1, 0, True
            try:
                return real_publish(*a, **kw)
            finally:
                self.inside = False
        monkeypatch.setattr(rlhf.run, "publish", publish)


def in_child(fn, log: Path) -> int:
    """Run ``fn()`` in a forked copy of this process (stdout/stderr to ``log``); its exit status."""
    return wait(start(fn, log))


def start(fn, log: Path) -> int:
    pid = os.fork()
    if pid == 0:
        child(fn, log)
    return pid


def wait(pid: int) -> int:
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def child(fn, log: Path) -> None:
    """The body of a forked child: ``fn()``'s result is the exit status; never returns into pytest."""
    status = 1
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout = os.fdopen(os.dup(1), "w", buffering=1)  # (pytest's capture objects are not fd 1/2)
        sys.stderr = os.fdopen(os.dup(2), "w", buffering=1)
        logging.getLogger("rlhf").addHandler(logging.StreamHandler(sys.stderr))
        status = fn()
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status if isinstance(status, int) else 1)


def train_in_child(argv: list[str], log: Path, steps: Steps | None = None, background: bool = False) -> int:
    """Exit status of ``rlhf ARGV`` in a forked child (``background``: its pid, not waited for)."""
    def run():
        if steps is not None:
            steps.install(pytest.MonkeyPatch())  # (the child's own copy of the functions)
        return main(argv)
    return start(run, log) if background else in_child(run, log)


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory):
    """An uninterrupted run, in this process (so that every module a run imports is loaded
    before the children fork), with its save steps counted: (metrics, adapter), steps."""
    run = tmp_path_factory.mktemp("reference") / "full"
    counting = Steps(run)
    with pytest.MonkeyPatch.context() as mp:
        counting.install(mp)
        assert main(train_argv(tiny_model, run)) == 0
    return outcome(run), counting.seen


def outcome(run: Path) -> tuple[list[dict], dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]
    return rows, load_file(str(run / "adapter" / "adapter_model.safetensors"))


def assert_same(got: tuple, want: tuple, what: str) -> None:
    # the same program on the same numbers in the same process image: bit-identical floats
    assert got[0] == want[0], what
    assert got[1].keys() == want[1].keys(), what
    for name, t in want[1].items():
        assert torch.equal(got[1][name], t), (what, name)


def test_a_kill_at_every_step_of_a_save_then_resume_matches_an_uninterrupted_run(tiny_model, tmp_path, reference):
    want, seen = reference
    assert any(float(t.abs().max()) > 0 for n, t in want[1].items() if "lora_B" in n)  # it trained
    assert sorted({s for s, *_ in seen}) == [1, 2]  # save_every=1, two steps; the last save is not repeated
    ops = {op for *_, op, _ in seen}
    assert {"mkdir", "fsync", "rename", "replace", "symlink", "rmtree", "rmtree-half"} <= ops and \
        any(op.startswith("open-w") for op in ops), ops

    # every step of the second save (one that replaces a checkpoint: each step a save can
    # make); of the first, the steps from its rename on (before it there is nothing to resume,
    # as at its rename: checked once)
    rename = next(k for save, k, op, _ in seen if save == 1 and op == "rename")
    points = [p for p in seen if p[0] == 2 or p[1] >= rename]
    t0 = time.time()
    width = max(1, min(4, os.cpu_count() or 1))  # children run side by side, one thread each
    for i in range(0, len(points), width):
        batch = points[i:i + width]
        runs = [tmp_path / f"kill-{save}-{k}" for save, k, *_ in batch]
        pids = [train_in_child(train_argv(tiny_model, run), tmp_path / f"{run.name}.log",
                               Steps(run, kill_at=(save, k)), background=True)
                for run, (save, k, *_) in zip(runs, batch)]
        for pid, (save, k, op, name) in zip(pids, batch):
            assert wait(pid) == KILLED, f"killed before step {k} of save {save} ({op} {name})"
        lefts = [leftovers(run) for run in runs]
        pids = [train_in_child(["train", "--resume", str(run), "--no-progress"], tmp_path / f"{run.name}.resume.log",
                               background=True) for run in runs]
        for pid, run, left, (save, k, op, name) in zip(pids, runs, lefts, batch):
            what = f"killed before step {k} of save {save} ({op} {name})"
            status, log = wait(pid), (tmp_path / f"{run.name}.resume.log").read_text()
            if save == 1 and k == rename:  # killed before the first checkpoint existed: nothing to resume
                assert status == 2 and "no checkpoint to resume from" in log, (what, log[-2000:])
                continue
            assert status == 0, (what, log[-3000:])
            assert_same(outcome(run), want, what)
            for entry in left:  # each leftover is removed (or adopted) with a logged line
                assert entry in log, (what, entry, log[-2000:])
            assert sorted(e for e in os.listdir(run) if e.startswith(".")) == [], what
            assert sorted(e for e in os.listdir(run) if e.startswith("checkpoint-")) == ["checkpoint-000002"], what
    print(f"{len(points)} kill points, {time.time() - t0:.1f} s")


def leftovers(run: Path) -> list[str]:
    """What a killed save left beside the published checkpoint: temporaries, and versions
    the ``checkpoint`` link does not point to."""
    link = run / "checkpoint"
    current = os.readlink(link) if link.is_symlink() else None
    return [e for e in os.listdir(run) if e.startswith(".") or e.startswith("checkpoint-") and e != current]


@pytest.mark.parametrize("fail_errno", [errno.ENOSPC, errno.EROFS])
def test_a_full_or_read_only_disk_during_a_save_stops_the_run_with_the_last_checkpoint_intact(
        tiny_model, tmp_path, reference, fail_errno):
    """The OSError is raised at each kind of step of the second save (the file write, an
    fsync, the directory rename, the link swap): one sentence, exit status 2, the first
    checkpoint whole and published, and a resume then ends as an uninterrupted run does."""
    want, seen = reference
    first = {op: k for save, k, op, _ in reversed(seen) if save == 2}  # each op's first step in save 2
    for op in ("open-wb", "fsync", "rename", "replace"):
        run = tmp_path / f"fail-{op}"
        log = tmp_path / f"fail-{op}.log"
        assert train_in_child(train_argv(tiny_model, run), log,
                              Steps(run, fail_at=(2, first[op]), fail_errno=fail_errno)) == 2, log.read_text()[-3000:]
        err = [x for x in log.read_text().splitlines() if x.startswith("error:")]
        assert len(err) == 1 and os.strerror(fail_errno) in err[0] and "previous checkpoint is intact" in err[0] \
            and "Traceback" not in log.read_text(), (op, log.read_text()[-2000:])
        state = torch.load(run / "checkpoint" / "state.pt", weights_only=True)
        assert state["counters"]["step"] in (1, 2), op  # 2: the new one was published before the failure
        assert (run / "adapter" / "adapter_model.safetensors").is_file(), op
        assert not list(run.glob(".checkpoint-*.tmp")), op  # the failed save's temporary is removed
        log = tmp_path / "resume.log"
        assert train_in_child(["train", "--resume", str(run), "--no-progress"], log) == 0, log.read_text()[-3000:]
        assert_same(outcome(run), want, f"resumed after {os.strerror(fail_errno)} at {op}")


def test_a_second_process_on_the_same_run_directory_is_refused(tiny_model, tmp_path, reference):
    """The first run (a forked child, held at its second step) keeps the directory's lock; a
    real second process (``rlhf train --resume``) is refused in one sentence and writes
    nothing; the first then finishes as if alone."""
    run, go = tmp_path / "run", tmp_path / "go"
    first_log = tmp_path / "first.log"

    def first():
        import rlhf.run

        log_row = rlhf.run.Run.log

        def held(self, row):
            log_row(self, row)
            while row["step"] == 1 and not go.exists():  # hold here until the second was refused
                time.sleep(0.05)
        rlhf.run.Run.log = held
        return main(train_argv(tiny_model, run))

    pid = os.fork()
    if pid == 0:
        child(first, first_log)
    try:
        deadline = time.time() + 240
        while not (run / "metrics.jsonl").is_file() and time.time() < deadline:
            time.sleep(0.05)
        assert (run / "metrics.jsonl").is_file(), first_log.read_text()[-3000:]
        before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
        second = subprocess.run([sys.executable, "-m", "rlhf.cli", "train", "--resume", str(run), "--no-progress"],
                                capture_output=True, text=True, timeout=240)
        assert second.returncode == 2, second.stderr[-2000:]
        assert second.stderr.strip().splitlines()[-1] == \
            f"error: run directory {str(run)!r} is in use by another rlhf process (pid {pid}); wait for it " \
            "to end, or choose another --run-dir"
        assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before  # nothing written
    finally:
        go.write_text("")
        status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    assert status == 0, first_log.read_text()[-3000:]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert torch.load(run / "checkpoint" / "state.pt", weights_only=True)["counters"]["step"] == 2


def test_soak_sigkill_at_random_moments_until_done_matches_an_uninterrupted_run(tiny_model, tmp_path, reference):
    """A run SIGKILLed at seeded-random moments (once its first checkpoint exists) and resumed,
    again and again until it finishes, ends with the metrics and adapter of a run left alone."""
    import random
    import signal

    argv = [*train_argv(tiny_model, tmp_path / "alone"), "--set", "steps=6"]
    t0 = time.time()
    assert main(argv) == 0
    alone_s = time.time() - t0  # kills are timed as fractions of it: any CPU kills mid-run
    want = outcome(tmp_path / "alone")
    run = tmp_path / "soak"
    argv = [*train_argv(tiny_model, run), "--set", "steps=6"]
    rng, kills = random.Random(12), 0
    pid = train_in_child(argv, tmp_path / "soak.log", background=True)
    while not (run / "checkpoint").is_dir():
        time.sleep(0.005)
    for _ in range(5):
        time.sleep(rng.uniform(0.05, 0.5) * alone_s)
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:  # finished before this kill
            pid = None
            assert os.waitstatus_to_exitcode(status) == 0, (tmp_path / "soak.log").read_text()[-3000:]
            break
        os.kill(pid, signal.SIGKILL)
        assert wait(pid) == -signal.SIGKILL
        kills += 1
        pid = train_in_child(["train", "--resume", str(run), "--no-progress"], tmp_path / "soak.log",
                             background=True)
    if pid is not None:
        assert wait(pid) == 0, (tmp_path / "soak.log").read_text()[-3000:]
    assert kills >= 1
    assert_same(outcome(run), want, f"after {kills} kills")
    print(f"soak: {kills} kills")


def test_ctrl_c_keeps_the_mid_run_adapter_and_a_resume_goes_on_from_the_checkpoint(tiny_model, tmp_path, reference):
    flag = tmp_path / "interrupt"
    (tmp_path / "reward.py").write_text(
        "import os\n"
        "calls = []\n"
        "def stop_at_step_3(prompts, completions, **kw):\n"
        "    calls.append(1)\n"
        f"    if len(calls) == 3 and os.path.exists({str(flag)!r}):\n"
        "        raise KeyboardInterrupt\n"
        "    return [float(len(str(c))) / 10 for c in completions]\n")
    run = tmp_path / "run"
    argv = [*train_argv(tiny_model, run), "--set", "steps=4", "--set", "save_every=2",
            "--set", f"rewards=[{tmp_path / 'reward.py'}:stop_at_step_3]"]
    flag.write_text("")
    assert main(argv) == 130
    assert os.readlink(run / "adapter") == "adapter-000002"  # the weights when interrupted, written whole
    assert os.readlink(run / "checkpoint") == "checkpoint-000002"
    flag.unlink()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert os.readlink(run / "adapter") == "checkpoint-000004/adapter"
    assert sorted(e for e in os.listdir(run) if "-0" in e) == ["checkpoint-000004"]  # the interrupted one removed

"""A cgroup per run: memory (shared memory and tmpfs pages included) and process count bounded for
all the program's processes together, and a kill that reaches every one of them.

cgroup v2 where the trainer's own cgroup can delegate ``memory`` and ``pids``; else cgroup v1 with
the ``memory`` and ``pids`` hierarchies (each run's group is made under the trainer's own group of
that hierarchy, so whatever bounds the trainer still bounds the run). ``create`` returns None where
neither can be made (not root, read-only /sys/fs/cgroup).
"""
from __future__ import annotations

import glob
import os
import signal
import time

ROOT = "/sys/fs/cgroup"


def _own_paths() -> dict[str, str]:
    """controller ('' for v2) -> this process's cgroup path, from /proc/self/cgroup."""
    out = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, ctrls, path = line.rstrip("\n").split(":", 2)
            for c in ctrls.split(",") if ctrls else [""]:
                out[c] = path
    return out


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


class RunCgroup:
    """The groups (one for v2, one per controller for v1) that hold one run."""

    def __init__(self, dirs: list[str], version: int):
        self.dirs, self.version = dirs, version

    @property
    def procs_files(self) -> list[str]:
        return [os.path.join(d, "cgroup.procs") for d in self.dirs]

    def pids(self) -> set[int]:
        found = set()
        for f in self.procs_files:
            try:
                with open(f) as fh:
                    found |= {int(x) for x in fh.read().split()}
            except OSError:
                pass
        return found

    def kill(self, timeout: float = 5.0) -> bool:
        """SIGKILL every process in the group (forks racing the kill included); True once empty."""
        kill_file = os.path.join(self.dirs[0], "cgroup.kill")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pids = self.pids()
            if not pids:
                return True
            if self.version == 2 and os.path.exists(kill_file):
                try:
                    _write(kill_file, "1")
                except OSError:
                    pass
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            time.sleep(0.005)
        return not self.pids()

    def remove(self) -> None:
        for d in self.dirs:
            for _ in range(200):  # rmdir fails (EBUSY) until the last task is fully gone
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.01)


def _v2(name: str, memory: int, pids: int) -> RunCgroup | None:
    own = _own_paths().get("")
    for mnt in (os.path.join(ROOT, "unified"), ROOT):
        if own is None or not os.path.exists(os.path.join(mnt, "cgroup.subtree_control")):
            continue
        parent = os.path.join(mnt, own.lstrip("/"))
        try:
            with open(os.path.join(parent, "cgroup.subtree_control")) as f:
                have = set(f.read().split())
            if not {"memory", "pids"} <= have:
                _write(os.path.join(parent, "cgroup.subtree_control"), "+memory +pids")
            d = os.path.join(parent, name)
            os.mkdir(d)
        except OSError:
            continue
        try:
            _write(os.path.join(d, "memory.max"), str(memory))
            if os.path.exists(os.path.join(d, "memory.swap.max")):
                _write(os.path.join(d, "memory.swap.max"), "0")
            _write(os.path.join(d, "pids.max"), str(pids))
            return RunCgroup([d], 2)
        except OSError:
            RunCgroup([d], 2).remove()
    return None


def _v1(name: str, memory: int, pids: int) -> RunCgroup | None:
    own = _own_paths()
    made: list[str] = []
    try:
        for ctrl in ("memory", "pids"):
            d = os.path.join(ROOT, ctrl, own[ctrl].lstrip("/"), name)
            os.mkdir(d)
            made.append(d)
        _write(os.path.join(made[0], "memory.limit_in_bytes"), str(memory))
        if os.path.exists(os.path.join(made[0], "memory.memsw.limit_in_bytes")):
            _write(os.path.join(made[0], "memory.memsw.limit_in_bytes"), str(memory))
        _write(os.path.join(made[1], "pids.max"), str(pids))
        return RunCgroup(made, 1)
    except (OSError, KeyError):
        RunCgroup(made, 1).remove()
        return None


def create(memory_bytes: int, max_pids: int) -> RunCgroup | None:
    """A fresh group bounded to ``memory_bytes`` and ``max_pids`` tasks, or None where none can be made."""
    if os.geteuid() != 0:
        return None
    name = "rlhf-sandbox-%d-%s" % (os.getpid(), os.urandom(4).hex())
    try:
        group = _v2(name, memory_bytes, max_pids) or _v1(name, memory_bytes, max_pids)
    except OSError:
        return None
    if group is not None and not _swept:
        _sweep(group)
    return group


_swept: list[bool] = []


def _sweep(group: RunCgroup) -> None:
    """Once per trainer: remove the empty groups that a trainer killed mid-run left (its pid is gone
    here; a group that still holds a process, maybe another namespace's, is left alone)."""
    _swept.append(True)
    for d in group.dirs:
        for old in glob.glob(os.path.join(os.path.dirname(d), "rlhf-sandbox-*-*")):
            pid = os.path.basename(old).split("-")[2]
            if old != d and pid.isdigit() and not os.path.exists("/proc/" + pid):
                try:
                    os.rmdir(old)
                except OSError:
                    pass

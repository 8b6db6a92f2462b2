"""``run_python``: one sandboxed run, from the trainer's side (see the package docstring)."""
from __future__ import annotations

import json
import os
import random
import selectors
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import asdict
from functools import lru_cache

from rlhf.sandbox.bwrap import argv as bwrap_argv, available as bwrap_available
from rlhf.sandbox.cgroup import RunCgroup, create
from rlhf.sandbox.limits import Limits, Result
from rlhf.sandbox.rootfs import DEVICES, binds, interpreter

LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_launcher.py")
LAUNCHER_PROCS = 3  # the launcher (or bubblewrap's two) and the namespace's init, in the pids budget
PRELOAD = ("math", "cmath", "re", "string", "itertools", "functools", "collections", "heapq", "bisect",
           "array", "copy", "decimal", "fractions", "statistics", "random", "json", "typing",
           "dataclasses", "operator", "io", "time", "datetime", "enum", "textwrap", "unicodedata",
           "struct", "traceback", "socket", "encodings.idna", "threading", "hashlib", "subprocess", "tempfile",
           "shutil", "pathlib", "glob", "contextlib", "queue", "concurrent.futures", "base64", "binascii",
           "zlib", "secrets", "hmac", "pprint", "csv", "argparse", "ctypes", "select", "selectors", "signal",
           "mmap", "fnmatch", "weakref", "abc", "numbers", "sqlite3", "uuid", "multiprocessing")


def backends() -> tuple[str, ...]:
    """The backends usable here: ``bwrap`` where bubblewrap is installed and we are root, ``inhouse``."""
    return (("bwrap",) if bwrap_available() else ()) + ("inhouse",)


def run_python(program: str, stdin: str = "", limits: Limits = Limits(), backend: str | None = None) -> Result:
    """Run ``program`` in the sandbox with ``stdin``; never raises for anything the program does."""
    backend = backend or os.environ.get("RLHF_SANDBOX_BACKEND") or backends()[0]
    return _run(program, stdin, limits, backend, os.geteuid() != 0 and _user_namespace_works())


@lru_cache(maxsize=1)
def _user_namespace_works() -> bool:
    """Not root: whether a user namespace gives the program its own root here (probed once)."""
    r = _run("pass", "", Limits(wall_s=30), "inhouse", True)
    return r.returncode == 0 and "root" in r.layers


def _run(program: str, stdin: str, limits: Limits, backend: str, userns: bool) -> Result:
    work = tempfile.mkdtemp(prefix="rlhf-sandbox-")
    uid = _pick_uid() if os.geteuid() == 0 else None
    group = create(limits.memory_mb << 20, limits.processes + LAUNCHER_PROCS) if uid is not None else None
    try:
        with open(os.path.join(work, "prog.py"), "w", encoding="utf-8", errors="replace") as f:
            f.write(program)
        with open(os.path.join(work, "input.txt"), "w", encoding="utf-8", errors="replace") as f:
            f.write(stdin)
        if uid is not None:
            os.chown(work, uid, uid)
        proc = _start(work, uid, limits, backend, group, userns)
        try:
            out, err, timed_out, truncated = _collect(proc, limits)
        finally:
            _kill_all(proc, group, uid)
    finally:
        if group is not None:
            group.remove()
        shutil.rmtree(work, ignore_errors=True)
    text = err.decode("utf-8", "replace")
    layers = ("cgroup",) if group is not None else ()
    if text.startswith("\0layers:"):
        first, _, text = text.partition("\n")
        layers = tuple(x for x in first[len("\0layers:"):].split(",") if x) + layers
    return Result(out.decode("utf-8", "replace"), None if timed_out or truncated else proc.returncode,
                  timed_out, truncated, text, layers, backend)


def _start(work: str, uid: int | None, limits: Limits, backend: str, group: RunCgroup | None, userns: bool):
    pairs, hide = binds()
    cfg = {"uid": uid, "userns": userns, "limits": asdict(limits), "preload": PRELOAD, "exe": interpreter(), "binds": pairs,
           "hide": hide, "devices": DEVICES, "backend": backend,
           "cgroup_procs": group.procs_files if group is not None else []}
    if backend == "bwrap":
        path = bwrap_available()
        if path is None or uid is None:
            raise RuntimeError("the bwrap backend needs bubblewrap installed and root")
        cfg["bwrap"] = bwrap_argv(path, work, limits.disk_mb, _launcher_source(), json.dumps(cfg))
    with open(os.path.join(work, "input.txt"), "rb") as fin:
        return subprocess.Popen([interpreter(), "-I", "-S", LAUNCHER, json.dumps(cfg)], stdin=fin,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=work, env={},
                                start_new_session=True, close_fds=True)


@lru_cache(maxsize=1)
def _launcher_source() -> str:
    with open(LAUNCHER, encoding="utf-8") as f:
        return f.read()


def _collect(proc: subprocess.Popen, limits: Limits):
    """Read stdout/stderr until both close, the wall clock runs out or stdout passes the cap."""
    caps = {proc.stdout: limits.output_kb << 10, proc.stderr: 64 << 10}
    bufs = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    deadline = time.monotonic() + limits.wall_s
    timed_out = truncated = False
    with selectors.DefaultSelector() as sel:
        for f in bufs:
            sel.register(f, selectors.EVENT_READ)
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            for key, _ in sel.select(left):
                chunk = os.read(key.fileobj.fileno(), 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                buf = bufs[key.fileobj]
                buf += chunk[:max(caps[key.fileobj] - len(buf), 0)]
                if key.fileobj is proc.stdout and len(buf) >= caps[proc.stdout]:
                    truncated = True
            if truncated:
                break
    if not timed_out and not truncated:
        try:
            proc.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            timed_out = True
    for f in bufs:
        f.close()
    return bytes(bufs[proc.stdout]), bytes(bufs[proc.stderr]), timed_out, truncated


def _kill_all(proc: subprocess.Popen, group: RunCgroup | None, uid: int | None) -> None:
    """Every process of the run dies: the launcher's process group, then the whole cgroup (which no
    setsid, double fork or ignored signal leaves), else every process of the run's uid."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    emptied = group.kill() if group is not None else False
    proc.wait()
    if not emptied and uid is not None:
        _reap(uid)


def _reap(uid: int) -> None:
    """Kill every process of the program's uid, from a process running as that uid (kill(-1))."""
    subprocess.run([interpreter(), "-I", "-S", "-c",
                    f"import os; os.setgroups([]); os.setgid({uid}); os.setuid({uid}); os.kill(-1, 9)"],
                   env={}, stderr=subprocess.DEVNULL, check=False)


def _pick_uid() -> int:
    """A random uid no account uses (so RLIMIT_NPROC and kill(-1) concern this run alone); within
    the uid map of a user-namespaced container, else nobody (65534)."""
    try:
        with open("/proc/self/uid_map") as f:
            spans = [tuple(map(int, line.split())) for line in f if line.strip()]
    except OSError:
        spans = [(0, 0, 65536)]
    uid = random.SystemRandom().randrange(2_000_000_000, 2_100_000_000)
    return uid if any(a <= uid < a + n for a, _, n in spans) else 65534

"""Run an untrusted Python program (a model's completion) in a separate, limited process.

``run_python(program, stdin, limits)`` runs ``program`` with ``stdin`` as its standard input and
returns what it printed. The layers, and when each holds (``isolation()`` says which hold here):

* always: a fresh process started with ``python -I -S`` (no site-packages, no user site, no
  PYTHON* variables), an empty environment (``env={}``), cwd an empty temporary directory that is
  deleted afterwards, a wall-clock kill of its whole process group, captured output capped
  (``output_kb``), and rlimits: CPU time (``RLIMIT_CPU``, SIGKILL at the limit), address space
  (``RLIMIT_AS``), file size (``RLIMIT_FSIZE``), open files, no core dumps.
* as root (layer ``uid``): the program runs as a fresh unprivileged uid picked at random per run
  (no groups, ``no_new_privs``), so it cannot write, read or signal anything root owns (the
  trainer, its files, ``/proc/<pid>/environ``), and ``RLIMIT_NPROC`` counts only its own
  processes. (Root ignores ``RLIMIT_NPROC``; that is why the uid change is what bounds a fork bomb.)
  Because the interpreter's files may be unreadable for that uid (e.g. under a 0700 ``/root``),
  the standard-library modules in ``PRELOAD`` are imported before the switch; importing others
  works only where the interpreter's files are world-readable.
* with CAP_SYS_ADMIN (root outside a restricted container): new network namespace (layer
  ``net``: only a loopback that is down, so every connect fails, 127.0.0.1 included), new PID
  namespace (``pid``: the program is PID 1 of its own namespace, ``/proc`` shows only its
  processes, and when it exits or is killed every process it started dies with it), new IPC
  namespace (``ipc``) and new mount namespace (``mount``) in which its directory is a fresh tmpfs of
  ``disk_mb`` (so all its files together are bounded, not only each one) and the usual
  world-writable directories (``COVERED``: /tmp, /var/tmp, /dev/shm, /run/lock, /dev/mqueue) are
  hidden under empty read-only tmpfs mounts. With ``uid`` and ``mount`` that directory is the only
  place the program can create files on a machine whose other world-writable directories are those
  (on the development machine ``find / -xdev -type d -perm -0002`` lists /tmp, /var/tmp and
  /run/lock; another machine may have more); it may still write device nodes such as /dev/null and
  *read* whatever is world-readable. Without ``mount`` the directory is on disk under /tmp and only
  each file's size is bounded.
* not enforced: seccomp syscall filtering, CPU share/niceness beyond ``RLIMIT_CPU``, disk I/O
  bandwidth. Without root, none of ``uid``/``net``/``pid``/``mount`` holds: the program runs as
  the trainer's user with rlimits only, so use a container (``isolation()`` tells you).
"""
from __future__ import annotations

import json
import os
import random
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import lru_cache

COVERED = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/dev/mqueue")
PRELOAD = ("math", "cmath", "re", "string", "itertools", "functools", "collections", "heapq", "bisect",
           "array", "copy", "decimal", "fractions", "statistics", "random", "json", "typing",
           "dataclasses", "operator", "io", "time", "datetime", "enum", "textwrap", "unicodedata",
           "struct", "traceback", "socket", "encodings.idna")


@dataclass(frozen=True)
class Limits:
    cpu_s: int = 2            # RLIMIT_CPU (whole seconds; SIGKILL when reached)
    wall_s: float = 5.0       # wall-clock kill (covers sleeping / blocked programs and startup)
    memory_mb: int = 512      # RLIMIT_AS
    file_mb: int = 16         # RLIMIT_FSIZE (one file)
    disk_mb: int = 64         # all files together (its directory is a tmpfs of this size; needs mount)
    processes: int = 16       # RLIMIT_NPROC for the program's own uid (needs the uid layer)
    output_kb: int = 256      # stdout kept; more kills the program


@dataclass
class Result:
    stdout: str
    returncode: int | None    # None when killed by the wall clock or the output cap
    timed_out: bool
    output_truncated: bool
    stderr: str = ""
    layers: tuple[str, ...] = ()


# Runs as root (when the trainer is root) in the child: namespaces, mounts, limits, uid switch, then
# the program itself in a forked process (PID 1 of the new PID namespace when there is one).
_LAUNCHER = r"""
import ctypes, json, os, resource, signal, sys
cfg = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: die with the trainer
layers = [n for n, f in (("net", 0x40000000), ("mount", 0x20000), ("pid", 0x20000000), ("ipc", 0x8000000))
          if cfg["uid"] is not None and libc.unshare(f) == 0]
src = open("prog.py", encoding="utf-8", errors="replace").read()
L = cfg["limits"]
pid = os.fork()
if pid:
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    os._exit(code if code >= 0 else 128 - code)
try:
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)
    if "mount" in layers:
        if libc.mount(b"none", b"/", None, 16384 | (1 << 18), None) != 0:  # MS_REC | MS_PRIVATE
            raise OSError(ctypes.get_errno(), "making mounts private")
        here = os.getcwd()  # replaced by a size-limited tmpfs that the program's uid owns
        opts = "size=%dm,nr_inodes=4096,mode=700,uid=%d,gid=%d" % (L["disk_mb"], cfg["uid"], cfg["uid"])
        if libc.mount(b"tmpfs", here.encode(), b"tmpfs", 2 | 4, opts.encode()) != 0:
            raise OSError(ctypes.get_errno(), "mounting the work directory")
        os.chdir(here)
        for d in cfg["covered"]:
            if os.path.isdir(d) and libc.mount(b"tmpfs", d.encode(), b"tmpfs", 1 | 2 | 4, b"size=4k") != 0:
                raise OSError(ctypes.get_errno(), "covering " + d)
        if "pid" in layers and libc.mount(b"proc", b"/proc", b"proc", 2 | 4 | 8, None) != 0:
            raise OSError(ctypes.get_errno(), "mounting /proc")
    for m in cfg["preload"]:
        try:
            __import__(m)
        except ImportError:
            pass
    for res, v in ((resource.RLIMIT_CPU, L["cpu_s"]), (resource.RLIMIT_AS, L["memory_mb"] << 20),
                   (resource.RLIMIT_FSIZE, L["file_mb"] << 20), (resource.RLIMIT_NOFILE, 64),
                   (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(res, (v, v))
    if cfg["uid"] is not None:
        resource.setrlimit(resource.RLIMIT_NPROC, (L["processes"], L["processes"]))
        os.setgroups([])
        os.setgid(cfg["uid"])
        os.setuid(cfg["uid"])
        layers.append("uid")
    libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
    sys.stderr.write("\0layers:" + ",".join(layers) + "\n")
    sys.stderr.flush()
    code = compile(src, "prog.py", "exec")
except BaseException as exc:
    sys.stderr.write("\0sandbox setup failed: %r\n" % (exc,))
    sys.stderr.flush()
    os._exit(125)
del cfg, src, libc
sys.argv = ["prog.py"]
status = 0
try:
    exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
except SystemExit as exc:
    status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
except BaseException:
    import traceback
    traceback.print_exc()
    status = 1
try:
    sys.stdout.flush()
except BaseException:
    status = status or 1
os._exit(status)
"""


def run_python(program: str, stdin: str = "", limits: Limits = Limits()) -> Result:
    """Run ``program`` in the sandbox with ``stdin``; never raises for anything the program does."""
    work = tempfile.mkdtemp(prefix="rlhf-sandbox-")
    uid = _pick_uid() if os.geteuid() == 0 else None
    try:
        with open(os.path.join(work, "prog.py"), "w", encoding="utf-8", errors="replace") as f:
            f.write(program)
        with open(os.path.join(work, "input.txt"), "w", encoding="utf-8", errors="replace") as f:
            f.write(stdin)
        if uid is not None:
            os.chown(work, uid, uid)
        cfg = {"uid": uid, "covered": COVERED, "preload": PRELOAD, "limits": asdict(limits)}
        with open(os.path.join(work, "input.txt"), "rb") as fin:
            proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _LAUNCHER, json.dumps(cfg)],
                                    stdin=fin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=work,
                                    env={}, start_new_session=True, close_fds=True)
        try:
            out, err, timed_out, truncated = _collect(proc, limits)
        finally:
            _kill_group(proc)
        if uid is not None:
            _reap(uid, err)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = err.decode("utf-8", "replace")
    layers = ()
    if text.startswith("\0layers:"):
        first, _, text = text.partition("\n")
        layers = tuple(x for x in first[len("\0layers:"):].split(",") if x)
    return Result(out.decode("utf-8", "replace"), None if timed_out or truncated else proc.returncode,
                  timed_out, truncated, text, layers)


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


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the program (its own session)
    except ProcessLookupError:
        pass
    proc.wait()


def _reap(uid: int, err: bytes) -> None:
    """Without a PID namespace, a process the program started may have left its group (setsid):
    kill every process of the program's uid, from a process running as that uid (kill(-1))."""
    if b"\0layers:" in err and b"pid" in err.split(b"\n", 1)[0]:
        return  # the PID namespace died with its first process
    subprocess.run([sys.executable, "-I", "-S", "-c",
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


@lru_cache(maxsize=1)
def isolation() -> tuple[str, ...]:
    """The layers that hold on this machine (see the module docstring): a subset of
    ``("net", "mount", "pid", "ipc", "uid")``."""
    return run_python("pass", limits=Limits(wall_s=30)).layers


def missing_layers() -> tuple[str, ...]:
    return tuple(x for x in ("net", "mount", "pid", "ipc", "uid") if x not in isolation())

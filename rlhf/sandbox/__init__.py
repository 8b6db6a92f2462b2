"""Run an untrusted Python program (a model's completion) so that it cannot outlive the call,
exhaust the machine, read the user's files or reach a socket.

``run_python(program, stdin, limits)`` runs ``program`` with ``stdin`` as its standard input and
returns what it printed. ``isolation()`` says which layers hold on this machine. The layers:

* always (``rlimits``): a fresh ``python -I -S`` (no site-packages, no PYTHON* variables), an empty
  environment, a wall-clock kill, captured output capped (``output_kb``), and per-process rlimits:
  CPU time, address space (``memory_mb``), file size, open files, message queues, no core dumps.
* ``uid`` (trainer is root): the program runs as a fresh uid picked at random per run, no groups,
  ``no_new_privs``; it cannot signal or ptrace the trainer, and ``RLIMIT_NPROC`` counts only it.
* ``user`` (trainer not root, unprivileged user namespaces allowed, probed once): a user namespace
  in which the launcher may make the namespaces and the root below; the program is uid 1000 in it
  (the trainer's uid outside), without capabilities (dropped at exec), and ``RLIMIT_NPROC`` counts
  only the namespace's processes (Linux >= 5.14). Its PID namespace holds no process of the
  trainer's, so it can signal none. Memory stays bounded per process (no cgroup without root).
* ``cgroup`` (root, and /sys/fs/cgroup writable: cgroup v2 where the trainer's own group can enable
  memory+pids for a child, which v2 refuses to a non-root group holding processes, else the v1
  memory and pids hierarchies, under the trainer's own group): ``memory_mb`` bounds *all* the
  run's processes together, System V / POSIX shared memory and tmpfs pages included, and
  ``processes`` (+3 for the launcher) bounds their number; when the call returns every process in
  the group is killed, whatever it did to its session or process group (``cgroup.kill`` or a kill
  loop until the group is empty). Without it memory is bounded per process only, and a program
  can hold ``processes x memory_mb`` (``missing_layers()`` names it; ``code_tests`` logs it once).
* ``pid`` (CAP_SYS_ADMIN): the program runs under an init of ours, PID 1 of a new PID namespace,
  which exits when the program exits; the kernel then kills every process left in it (double fork,
  setsid, setpgid, ignored SIGTERM). It dies with the launcher (PR_SET_PDEATHSIG, set while root).
* ``net``, ``ipc``, ``uts``: no network at all (a down loopback: TCP to 127.0.0.1 and abstract unix
  sockets of the host are unreachable); private System V and POSIX IPC that die with the run.
* ``seccomp`` (x86_64, aarch64; needs no privilege): a filter under ``no_new_privs`` makes socket()
  fail for every family but AF_UNIX/AF_INET/AF_INET6 (AF_VSOCK is in no network namespace: in a VM
  it reaches the host), and removes io_uring (it opens sockets past seccomp), the keyrings (the
  trainer's session keyring is inherited), bpf, userfaultfd, perf_event_open and other ABIs.
* ``mount`` + ``root``: the program sees a read-only root on a tmpfs of its own holding only the
  interpreter, its standard library (site-packages hidden), the shared libraries they load (found
  with ``ldd``), /etc/ld.so.cache, /etc/localtime, /dev/{null,zero,full,random,urandom}, a /proc of
  its own PID namespace, and two writable tmpfs of ``disk_mb`` owned by its uid: ``/work`` (its
  cwd, holding prog.py) and ``/dev/shm``. No other file of the machine (the checkout, datasets,
  /root, /home, /etc, /tmp, unix socket files) exists for it; the directories leading to the
  interpreter are the sandbox's (0755), so an interpreter under a 0700 home imports fine.

Backends (``backends()``): ``bwrap`` where bubblewrap is installed (it makes the namespaces and the
root; the launcher still joins the cgroup and switches the uid), else ``inhouse`` (``_launcher.py``:
unshare, init, pivot_root with ctypes). Both give the layers above as root with CAP_SYS_ADMIN.
``run_python(..., backend=)`` or the environment variable ``RLHF_SANDBOX_BACKEND`` picks one.
Without root and without user namespaces only ``rlimits`` and ``seccomp`` hold; without root but
with them, all but ``uid`` (replaced by ``user``) and ``cgroup`` hold; as root without CAP_SYS_ADMIN,
``uid``, ``seccomp`` and maybe ``cgroup`` hold, and the program runs in the trainer's file system
(reads what is world-readable) with ``PRELOAD`` imported before the uid switch. On the development
and CI machines (Debian VM, root, cgroup v1 memory+pids, /dev/vsock) every layer holds, with either
backend.
Not enforced anywhere: a general syscall allowlist (the kernel's surface is the program's, user
namespaces included), CPU share beyond ``RLIMIT_CPU``, disk I/O bandwidth.
"""
from __future__ import annotations

from functools import lru_cache

from rlhf.sandbox.limits import Limits, Result
from rlhf.sandbox.run import backends, run_python

LAYERS = ("net", "mount", "pid", "ipc", "uid", "root", "cgroup", "seccomp")
__all__ = ["Limits", "Result", "run_python", "backends", "isolation", "missing_layers", "limits_note", "LAYERS"]
WITHOUT = {  # what is lost where a layer does not hold
    "cgroup": "memory is bounded per process (a run may hold processes x memory_mb)",
    "pid": "a process that left the program's session is killed through the cgroup or the uid, "
           "and outlives the call where neither holds",
    "net": "the program can open network connections",
    "ipc": "System V / POSIX IPC is the host's",
    "mount": "the program sees the machine's files",
    "root": "the program reads every world-readable file and writes every world-writable directory",
    "uid": "the program runs as the trainer's user, with no RLIMIT_NPROC (a fork bomb is bounded by the "
           "cgroup, if any)",
    "seccomp": "the program can open sockets of families no namespace covers (AF_VSOCK to a VM's host)",
}


@lru_cache(maxsize=None)
def isolation(backend: str | None = None) -> tuple[str, ...]:
    """The layers that hold on this machine for ``backend`` (default: the first of ``backends()``)."""
    return run_python("pass", limits=Limits(wall_s=30), backend=backend).layers


def missing_layers(backend: str | None = None) -> tuple[str, ...]:
    return tuple(x for x in LAYERS if x not in isolation(backend))


def limits_note(backend: str | None = None) -> str:
    """One line saying which layers hold here and what is lost without the others."""
    held, missing = isolation(backend), missing_layers(backend)
    lost = "; ".join(f"no {x}: {WITHOUT[x]}" for x in missing if x in WITHOUT)
    return (f"sandbox ({backend or backends()[0]}): layers holding: {', '.join(held) or 'rlimits only'}"
            + (f"; {lost} (rlhf/sandbox documents the layers; run as root with CAP_SYS_ADMIN)" if lost else ""))

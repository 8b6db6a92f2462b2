"""The bubblewrap backend: where ``bwrap`` is installed and the trainer is root, it makes the
namespaces, the read-only root and the program's tmpfs; the launcher still joins the cgroup first
and ``_launcher.py drop`` still switches to the program's uid and sets the rlimits."""
from __future__ import annotations

import os
import shutil
import subprocess
from functools import lru_cache

from rlhf.sandbox.rootfs import binds, interpreter


@lru_cache(maxsize=1)
def available() -> str | None:
    """The path of ``bwrap`` where it is installed and works here as root (as root it needs no user
    namespace, so the uid switch is real); None elsewhere."""
    path = shutil.which("bwrap")
    if not path or os.geteuid() != 0:
        return None
    probe = [path, "--ro-bind", "/", "/", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--", "/bin/true"]
    try:
        ok = subprocess.run(probe, capture_output=True, timeout=30, env={}).returncode == 0
    except (OSError, subprocess.SubprocessError):
        ok = False
    return path if ok else None


def argv(bwrap: str, host_work: str, disk_mb: int, launcher_source: str, cfg_json: str) -> list[str]:
    pairs, hide = binds()
    args = [bwrap, "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
            "--die-with-parent", "--new-session", "--cap-drop", "ALL",
            "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_CHOWN",
            "--cap-add", "CAP_FOWNER"]
    parents = {os.path.dirname(d) for _, d in pairs}
    parents = {a for p in parents for a in _ancestors(p)}
    for d in sorted(parents, key=lambda p: (p.count("/"), p)):  # 0755, not the source's (0700 /root)
        args += ["--perms", "0755", "--dir", d]
    for src, dst in pairs:
        args += ["--ro-bind-try", src, dst]
    for d in hide:
        args += ["--size", "4096", "--tmpfs", d, "--remount-ro", d]
    size = str(disk_mb << 20)
    args += ["--dev", "/dev", "--size", size, "--tmpfs", "/dev/shm", "--proc", "/proc",
             "--size", size, "--tmpfs", "/work",
             "--ro-bind", os.path.join(host_work, "prog.py"), "/work/prog.py",
             "--remount-ro", "/", "--chdir", "/work", "--",
             interpreter(), "-I", "-S", "-c", launcher_source, "drop", cfg_json]
    return args


def _ancestors(path: str) -> list[str]:
    out = []
    while path not in ("/", ""):
        out.append(path)
        path = os.path.dirname(path)
    return out

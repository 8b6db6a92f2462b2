"""What the program's read-only root holds: the interpreter, its standard library (without
site-packages), the shared libraries those load, and a few device nodes. Nothing else of the
machine is mounted in it, so neither the checkout, the datasets, /root, /home, /etc nor any unix
socket file can be reached; the directories leading to the interpreter are the sandbox's own (mode
0755), so an interpreter under a 0700 home is importable for the program's unprivileged uid.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from functools import lru_cache

DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
# read by the dynamic loader and by time.localtime; harmless, world-readable system files
SYSTEM_FILES = ("/etc/ld.so.cache", "/etc/localtime")


def interpreter() -> str:
    """The real interpreter (a virtual environment's ``python`` resolved to the base one)."""
    return os.path.realpath(sys.executable)


@lru_cache(maxsize=1)
def shared_libraries() -> tuple[str, ...]:
    """The interpreter's and its extension modules' shared libraries, as named and as resolved;
    the system library directories where ``ldd`` is missing."""
    objs = [interpreter()] + sorted(glob.glob(os.path.join(_stdlib(), "lib-dynload", "*.so")))
    ldd = shutil.which("ldd")
    if ldd is None:
        return tuple(d for d in ("/lib", "/lib64", "/usr/lib", "/usr/lib64") if os.path.isdir(d))
    try:
        out = subprocess.run([ldd, *objs], capture_output=True, text=True, timeout=60, env={}).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    libs = set()
    for line in out.splitlines():
        for word in line.split():
            if word.startswith("/") and not word.endswith(":") and os.path.exists(word):
                libs |= {os.path.normpath(word), os.path.realpath(word)}
    return tuple(sorted(libs))


@lru_cache(maxsize=1)
def binds() -> tuple[tuple[tuple[str, str], ...], tuple[str, ...]]:
    """(read-only binds as (source, target) pairs, directories to hide under an empty tmpfs)."""
    files = {interpreter(), *shared_libraries(), *(f for f in SYSTEM_FILES if os.path.isfile(f))}
    pairs = [(p, p) for p in sorted({_stdlib()} | files)]
    hide = os.path.join(_stdlib(), "site-packages")
    return tuple(pairs), ((hide,) if os.path.isdir(hide) else ())


def _stdlib() -> str:
    """The base interpreter's standard library directory (lib-dynload inside it)."""
    return os.path.dirname(os.path.realpath(os.__file__))

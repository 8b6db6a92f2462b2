"""What a run directory from elsewhere may hold, and how the run's writes stay inside it.

A run directory can be someone else's (``rlhf train --resume``, ``rlhf eval``): a symbolic link
planted in it would send a write to its target, outside the directory. So ``check_links``
refuses, in one sentence and before the run writes anything, a link the run did not make; and
the run's own files are opened with ``O_NOFOLLOW`` (appends, the lock), created with ``O_EXCL``
(temporaries) or replaced by a rename (``rlhf.storage``), so a link made later is not followed
either.
"""
from __future__ import annotations

import errno
import os
import re
from pathlib import Path

from rlhf.errors import UserError

# a file the run writes is opened without following a link in its place (a link planted in the
# run directory would send the write to its target) and without blocking on a planted FIFO
NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
APPEND_FILE = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_OWN_LINK = re.compile(r"^(?P<top>[^/]+-\d{6,}(?:\.\d+)?)(?:/[^/]+)*$")  # NAME-000012[/inner]


def planted_link(run_dir, name: str, target: str | None = None) -> UserError:
    """The one sentence for a symbolic link in a run directory that the run did not make."""
    path = Path(run_dir) / name
    if target is None:
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
    return UserError(f"{str(path)!r} is a symbolic link to {target!r} that rlhf did not make, and rlhf never "
                     "writes through such a link; remove it, or choose another --run-dir")


def check_links(run_dir) -> None:
    """Refuse (one sentence) a run directory holding a link the run did not make, before the run
    writes anything: at the top, every symbolic link must be a slot's (``NAME-000012`` or
    ``NAME-000012/inner``, relative, onto a version directory beside it or none) and every other
    entry a plain file or directory; deeper, no link may lead out of the run directory. (The
    files the run writes are then opened with ``O_NOFOLLOW`` / ``O_EXCL`` or replaced by a
    rename: a link made later is not followed either.)"""
    root = Path(run_dir)
    if not root.is_dir():
        return
    real = os.path.realpath(root)
    for entry in os.scandir(root):
        if entry.is_symlink():
            target = os.readlink(entry.path)
            m = _OWN_LINK.match(target)  # (dangling: a version removed by hand; recovery re-points it)
            if not (m and ".." not in target.split("/") and not (root / m["top"]).is_symlink()):
                raise planted_link(root, entry.name, target)
        elif not (entry.is_file(follow_symlinks=False) or entry.is_dir(follow_symlinks=False)):
            raise UserError(f"{entry.path!r} is neither a file nor a directory (a FIFO, socket or device), "
                            "which rlhf does not make; remove it, or choose another --run-dir")
    for dirpath, dirs, files in os.walk(root):
        if Path(dirpath) == root:
            continue
        for name in dirs + files:
            path = os.path.join(dirpath, name)
            if os.path.islink(path) and not _inside(path, real):
                raise planted_link(root, os.path.relpath(path, root))


def _inside(path: str, real_root: str) -> bool:
    """Whether ``path``, every link on the way followed, stays in the directory ``real_root``."""
    target = os.path.realpath(path)
    return target != real_root and target.startswith(real_root + os.sep)


def not_ours(path: Path, exc: OSError) -> Exception:
    """What opening one of the run's own files raised, as one sentence where something the run did
    not make holds its name (a link, a directory, a FIFO); else the error itself."""
    if exc.errno == errno.ELOOP:
        return planted_link(path.parent, path.name)
    if exc.errno in (errno.EISDIR, errno.ENXIO):
        return UserError(f"{str(path)!r} is not a regular file; rlhf writes its own {path.name} there: remove it, "
                         "or choose another --run-dir")
    return exc

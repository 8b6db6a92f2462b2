"""Crash-safe files in a run directory: versioned directories published by a symlink swap,
fsync before publication, recovery of what a crash left behind, and the run's lock.

A *slot* is a name in the run directory (``checkpoint``, ``policy``, ``reward_model``) that
is a relative symlink to its current version, a complete directory beside it::

    RUN_DIR/checkpoint -> checkpoint-000012        (the commit point: one atomic rename)
    RUN_DIR/adapter    -> checkpoint-000012/adapter (a follower: moves with the slot)
    RUN_DIR/checkpoint-000012/...                   (complete, fsynced)
    RUN_DIR/.checkpoint-000013.tmp/...              (being written; never read)

Publishing version v: write ``.NAME-v.tmp/``; fsync every file and directory in it; rename it
to ``NAME-v`` and fsync the run directory; swap the link (a new symlink renamed over the old
one: ``rename(2)`` is atomic) and fsync the run directory; swap the followers likewise; only
then remove the versions no link points to. At every instant the link names a complete,
durable version (or, before the first publication of a slot, nothing), so a process killed
at any step -- SIGKILL or power cut -- leaves the previous version or the new one whole.

Every step goes through the ``os`` functions (``os.mkdir``, ``os.rename``, ``os.replace``,
``os.symlink``, ``os.fsync``, ``open``), so a test can fail or kill any one of them
(tests/test_crash_safety.py). POSIX only (symlinks, ``fcntl``), as the trainers are.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import stat
from pathlib import Path

from rlhf.errors import UserError
from rlhf.run_dir_guard import APPEND_FILE, NEW_FILE, not_ours

log = logging.getLogger("rlhf")
LOCK_FILE = "run.lock"
_VERSION = re.compile(r"^(?P<name>.+)-(?P<step>\d{6,})(?:\.(?P<n>\d+))?$")


# ---------------------------------------------------------------------- fsync helpers
def fsync_path(path: Path) -> None:
    """Flush one file's or directory's data and metadata to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file, then every directory bottom-up, of ``root`` (``root`` last)."""
    for dirpath, _, files in os.walk(root, topdown=False):
        for f in sorted(files):
            fsync_path(Path(dirpath) / f)
        fsync_path(Path(dirpath))


def write_durable(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file ``path`` and fsync it (publication is the caller's rename).
    Whatever held the name before (a temporary left by a crash, a planted link) is unlinked,
    never written through: the file is created afresh (``O_EXCL``)."""
    if os.path.lexists(path):
        os.unlink(path)
    fd = os.open(path, NEW_FILE, 0o666)
    with open(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def append_file(path: Path, data: bytes) -> None:
    """Append ``data`` to the run's own file ``path`` (created if missing). A link in its place is
    refused in one sentence; a file with other hard links (a copy made with ``cp -al``, or a
    planted one) is first replaced by a private copy, so the other names keep their content."""
    path = Path(path)
    try:
        fd = os.open(path, APPEND_FILE, 0o666)
    except OSError as exc:
        raise not_ours(path, exc) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UserError(f"{str(path)!r} is not a regular file; rlhf writes its own {path.name} there: "
                            "remove it, or choose another --run-dir")
        if st.st_nlink > 1:
            os.close(fd)
            fd = None
            replace_file(path, path.read_bytes())  # (the rename gives this name its own inode)
            fd = os.open(path, APPEND_FILE, 0o666)
        _write_all(fd, data)
    finally:
        if fd is not None:
            os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def replace_file(path: Path, data: bytes) -> None:
    """Atomically make ``path`` hold ``data``: a fsynced sibling renamed over it, then the
    directory fsynced. A crash leaves the old content or the new, never a torn file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    write_durable(tmp, data)
    os.replace(tmp, path)
    fsync_path(path.parent)


def point(link: Path, target: str) -> None:
    """Make ``link`` a symlink to ``target`` (relative to its directory), atomically, durably.
    A real directory in its place (a run written before versioned saves) is moved aside to
    ``.NAME.old`` first, removed by ``collect_garbage``."""
    link = Path(link)
    if link.is_symlink() and os.readlink(link) == target:
        return
    if link.is_dir() and not link.is_symlink():
        aside = link.with_name(f".{link.name}.old")
        if aside.exists():
            shutil.rmtree(aside)
        os.rename(link, aside)
    tmp = link.with_name(f".{link.name}.link")
    if os.path.lexists(tmp):
        log.info("%s: removing %s left by an interrupted save", link.parent, tmp.name)
        os.unlink(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, link)
    fsync_path(link.parent)


# ---------------------------------------------------------------------- slots
class Slot:
    """A published name in ``run_dir`` whose value is a versioned directory (module docstring).
    ``follow``: {link name: path inside a version} re-pointed with every publication, e.g.
    ``{"adapter": "adapter"}`` keeps ``RUN_DIR/adapter`` on the newest checkpoint's adapter."""

    def __init__(self, run_dir, name: str, follow: dict[str, str] | None = None):
        self.dir, self.name, self.follow = Path(run_dir), name, dict(follow or {})
        self.link = self.dir / name

    def tmp_path(self, step: int) -> Path:
        """Where version ``step`` is built (the same path in every process of a run)."""
        return self.dir / f".{self.name}-{step:06d}.tmp"

    def current(self) -> Path | None:
        """The published version (a pre-versioning real directory counts), or None."""
        return self.link if self.link.is_dir() else None

    def publish(self, step: int, writer=None, fresh: bool = True, keep: int = 1) -> Path:
        """Build version ``step`` with ``writer(tmp_dir)`` (``fresh=False``: into the directory
        other processes already filled, see ``tmp_path``), then publish it as described in the
        module docstring; ``keep``: complete versions kept (the new one and ``keep - 1`` older
        ones to fall back on). Returns the link."""
        tmp = self.tmp_path(step)
        if fresh:
            if tmp.is_symlink() or tmp.is_file():
                os.unlink(tmp)  # (never written through)
            elif tmp.exists():
                shutil.rmtree(tmp)
            os.mkdir(tmp)
        if writer is not None:
            writer(tmp)
        fsync_tree(tmp)
        final = self._free_name(step)
        os.rename(tmp, self.dir / final)
        fsync_path(self.dir)
        replaced = {self._target_top(self.dir / n) for n in (self.name, *self.follow)}
        point(self.link, final)
        for link, inner in self.follow.items():
            point(self.dir / link, f"{final}/{inner}")
        self.collect_garbage(expected=replaced, keep=keep, quiet=True)
        return self.link

    def recover(self, keep: int | None = None) -> Path | None:
        """After a crash (call with the run's lock held, before reading the slot): point a
        missing or dangling link at the newest complete version, restore a directory the
        pre-versioning save left at ``.NAME.old``, re-point followers, remove leftovers (older
        complete versions beyond ``keep``: see ``collect_garbage``); each action is logged.
        Returns the current version or None."""
        if not self.link.is_dir():
            versions = self.versions()
            old = self.dir / f".{self.name}.old"
            if versions:
                log.warning("%s: %s had no valid link; pointing it at the newest complete version %s",
                            self.dir, self.name, versions[-1])
                point(self.link, versions[-1])
            elif old.is_dir() and not os.path.lexists(self.link):
                log.warning("%s: restoring %s from %s left by an interrupted save", self.dir, self.name, old.name)
                os.rename(old, self.link)
                fsync_path(self.dir)
        if self.link.is_dir():
            top = os.readlink(self.link) if self.link.is_symlink() else self.name
            for link, inner in self.follow.items():
                path, target = self.dir / link, f"{top}/{inner}"
                if not (path.is_symlink() and os.readlink(path) == target) and (self.link / inner).exists() \
                        and (path.is_symlink() or not path.exists()):  # (a pre-versioning real directory stays)
                    log.warning("%s: re-pointing %s at %s (a save was interrupted before it moved)",
                                self.dir, link, target)
                    point(path, target)
        self.collect_garbage(keep=keep)
        return self.current()

    def collect_garbage(self, expected=(), keep: int | None = None, quiet: bool = False) -> None:
        """Remove this slot's (and its followers') versions and temporaries no link points to,
        each with a logged line (``expected``: the versions a publication just replaced, quietly),
        except the ``keep - 1`` newest complete versions older than the published one (kept to fall
        back on; ``None``: every older one; ``quiet``: those beyond, pruned by a publication, without
        a line). Versions newer than the published one (a crash between their rename and the
        link's swap) are removed."""
        names = {self.name, *self.follow}
        kept = {self._target_top(self.dir / n) for n in names} - {None}
        versions, current = self.versions(), self._target_top(self.link)
        if current in versions:
            older = versions[:versions.index(current)]
            fallback = set(older if keep is None else older[len(older) - max(keep - 1, 0):])
            kept |= fallback
            if quiet:
                expected = {*expected, *(set(older) - fallback)}
        for entry in sorted(os.listdir(self.dir)):
            if entry in kept or not self._owned(entry, names):
                continue
            path = self.dir / entry
            if entry not in expected:
                log.info("%s: removing %s left by an earlier save", self.dir, entry)
            try:
                if path.is_symlink() or not path.is_dir():
                    os.unlink(path)
                else:
                    shutil.rmtree(path)
            except OSError as exc:  # (a read-only directory: harmless, removed by a later save)
                log.warning("%s: could not remove %s (%s)", self.dir, entry, exc.strerror)

    # ------------------------------------------------------------------ helpers
    def versions(self) -> list[str]:
        """Complete versions of this slot, oldest first."""
        found = []
        for entry in os.listdir(self.dir):
            m = _VERSION.match(entry)
            if m and m["name"] == self.name and (self.dir / entry).is_dir() and not (self.dir / entry).is_symlink():
                found.append((int(m["step"]), int(m["n"] or 0), entry))
        return [e for *_, e in sorted(found)]

    def _free_name(self, step: int) -> str:
        """``NAME-<step>``, or ``NAME-<step>.<n>`` when that step was published already."""
        name, n = f"{self.name}-{step:06d}", 0
        while os.path.lexists(self.dir / name):
            n += 1
            name = f"{self.name}-{step:06d}.{n}"
        return name

    @staticmethod
    def _target_top(link: Path) -> str | None:
        if not link.is_symlink():
            return None
        return Path(os.readlink(link)).parts[0]

    @staticmethod
    def _owned(entry: str, names: set[str]) -> bool:
        m = _VERSION.match(entry)
        if m and m["name"] in names:
            return True
        for n in names:
            if entry in (f".{n}.old", f".{n}.tmp", f".{n}.link") or \
                    entry.startswith(f".{n}-") and entry.endswith(".tmp"):
                return True
        return False


# ---------------------------------------------------------------------- failures
def save_failed(exc: BaseException, run_dir, what: str, kept: str) -> UserError:
    """The one sentence for a save the file system refused (disk full, read-only, quota...)."""
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return UserError(f"could not save {what} in {run_dir} ({reason}); {kept}; free disk space or make the "
                     f"directory writable, then continue with `rlhf train --resume {run_dir}`")


# what a disk or a mount refuses: full, over quota, file too large, read-only, not permitted, I/O error
REFUSALS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO)


def is_environment_error(exc: BaseException, run_dir) -> bool:
    """Whether ``exc``, raised while writing into ``run_dir``, is the file system refusing the
    write rather than a bug: an OSError with one of ``REFUSALS``, or a library's own error
    (torch's and safetensors' writers wrap the OS's) while the disk is full or the directory
    is not writable."""
    if isinstance(exc, OSError):
        return exc.errno in REFUSALS
    try:
        st = os.statvfs(run_dir)
        return st.f_bavail == 0 or not os.access(run_dir, os.W_OK)
    except OSError:
        return True


# ---------------------------------------------------------------------- the run's lock
def lock_run_dir(run_dir: Path) -> int:
    """Hold an exclusive ``flock`` on ``RUN_DIR/run.lock`` for this process's lifetime (the OS
    drops it when the process ends, however it ends). Another process holding it: one sentence."""
    import fcntl

    path = Path(run_dir) / LOCK_FILE
    fd = _open_lock(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise UserError(f"run directory {str(run_dir)!r} is in use by another rlhf process (pid {holder}); "
                        "wait for it to end, or choose another --run-dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _open_lock(path: Path) -> int:
    """``run.lock``, opened without following a link; one that is not the run's own plain file
    (a hard link to another file) is replaced by a new one, whose writes touch nothing else."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        raise not_ours(path, exc) from None
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
        return fd
    os.close(fd)
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{str(path)!r} is not a regular file; rlhf keeps its own {path.name} there: remove it, "
                        "or choose another --run-dir")
    os.unlink(path)  # (a hard link: the other name keeps its content)
    return os.open(path, flags | os.O_EXCL, 0o644)


def unlock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSONL file, every line that is not a JSON object left out (``read_rows``
    says which); [] when there is no file."""
    return read_rows(path)[0]


def read_rows(path: Path) -> tuple[list[dict], list[tuple[int, int]]]:
    """(rows, broken): the JSON objects of a JSONL file in order, and for each line that is not
    one, (its line number from 1, how many rows precede it). ([], []) when there is no file."""
    rows, broken, path = [], [], Path(path)
    if not path.is_file():
        return rows, broken
    for number, line in enumerate(path.read_bytes().decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        else:
            broken.append((number, len(rows)))
    return rows, broken

"""The crash-safe publication of run-directory files (rlhf/storage.py), without a model:
versions and links, fsync before publication, recovery of what crashes leave, the old
layout, a refused write, the run's lock."""
from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path

import pytest

from rlhf.checkpoint import LM_FOLLOW, recover
from rlhf.config import LMConfig
from rlhf.errors import UserError
from rlhf.run import Run
from rlhf.storage import Slot


def writer(text: str):
    def write(d: Path) -> None:
        (d / "adapter").mkdir()
        (d / "adapter" / "w.txt").write_text(text)
        (d / "state.pt").write_text(text)
    return write


def listing(run: Path) -> dict[str, str]:
    return {e: os.readlink(run / e) if (run / e).is_symlink() else "dir" for e in sorted(os.listdir(run))}


def test_publish_links_the_new_version_and_removes_the_old(tmp_path):
    slot = Slot(tmp_path, "checkpoint", LM_FOLLOW)
    slot.publish(1, writer("one"))
    slot.publish(2, writer("two"))
    assert listing(tmp_path) == {"adapter": "checkpoint-000002/adapter", "checkpoint": "checkpoint-000002",
                                 "checkpoint-000002": "dir"}
    assert (tmp_path / "adapter" / "w.txt").read_text() == "two"
    slot.publish(2, writer("again"))  # the same step twice (a last save repeated): a new name
    assert os.readlink(tmp_path / "checkpoint") == "checkpoint-000002.1"
    assert (tmp_path / "checkpoint" / "state.pt").read_text() == "again"


def test_every_file_and_directory_is_fsynced_before_the_rename_that_publishes_it(tmp_path, monkeypatch):
    events = []
    real_fsync, real_rename, real_open = os.fsync, os.rename, os.open
    names = {}

    def open_(path, flags, *a, **kw):
        fd = real_open(path, flags, *a, **kw)
        names[fd] = os.path.relpath(path, tmp_path)
        return fd

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", names.get(fd))), real_fsync(fd)))
    monkeypatch.setattr(os, "rename", lambda a, b: (events.append(("rename", str(a))), real_rename(a, b)))
    Slot(tmp_path, "checkpoint", LM_FOLLOW).publish(1, writer("one"))
    renamed = events.index(("rename", str(tmp_path / ".checkpoint-000001.tmp")))
    before = {n for op, n in events[:renamed] if op == "fsync"}
    tmp = ".checkpoint-000001.tmp"
    assert {tmp, f"{tmp}/adapter", f"{tmp}/adapter/w.txt", f"{tmp}/state.pt"} <= before
    assert ("fsync", ".") in events[renamed:]  # the run directory, after the rename and after each link swap


def test_recovery_adopts_a_version_whose_link_was_never_made_and_cleans_temporaries(tmp_path, caplog):
    slot = Slot(tmp_path, "checkpoint", LM_FOLLOW)
    slot.publish(1, writer("one"))
    os.unlink(tmp_path / "checkpoint")  # as if killed after the rename, before the link swap
    os.unlink(tmp_path / "adapter")
    (tmp_path / ".checkpoint-000002.tmp").mkdir()  # a later save, killed while writing
    os.symlink("checkpoint-000001", tmp_path / ".checkpoint.link")
    with caplog.at_level(logging.INFO, logger="rlhf"):
        found = recover(tmp_path, LM_FOLLOW)
    assert found == tmp_path / "checkpoint" and (found / "state.pt").read_text() == "one"
    assert listing(tmp_path) == {"adapter": "checkpoint-000001/adapter", "checkpoint": "checkpoint-000001",
                                 "checkpoint-000001": "dir"}
    for entry in ("checkpoint-000001", ".checkpoint-000002.tmp", ".checkpoint.link"):
        assert entry in caplog.text


def test_a_run_directory_of_the_old_layout_is_read_and_converted(tmp_path):
    """Before versioned saves: real ``checkpoint/`` and ``adapter/`` directories."""
    (tmp_path / "checkpoint").mkdir()
    writer("old")(tmp_path / "checkpoint")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "w.txt").write_text("old")
    (tmp_path / ".checkpoint.tmp").mkdir()  # the old save, killed while writing
    assert recover(tmp_path, LM_FOLLOW) == tmp_path / "checkpoint"
    assert (tmp_path / "checkpoint" / "state.pt").read_text() == "old"
    assert listing(tmp_path) == {"adapter": "dir", "checkpoint": "dir"}
    Slot(tmp_path, "checkpoint", LM_FOLLOW).publish(3, writer("new"))
    assert listing(tmp_path) == {"adapter": "checkpoint-000003/adapter", "checkpoint": "checkpoint-000003",
                                 "checkpoint-000003": "dir"}


def test_the_old_layouts_crash_between_its_two_renames_is_recovered(tmp_path, caplog):
    """The old save renamed checkpoint/ to .checkpoint.old, then .checkpoint.tmp to checkpoint/:
    killed between the two, its run said it had no checkpoint. Now the old one comes back."""
    (tmp_path / ".checkpoint.old").mkdir()
    writer("old")(tmp_path / ".checkpoint.old")
    (tmp_path / ".checkpoint.tmp").mkdir()
    with caplog.at_level(logging.INFO, logger="rlhf"):
        found = recover(tmp_path, LM_FOLLOW)
    assert found is not None and (found / "state.pt").read_text() == "old"
    assert ".checkpoint.old" in caplog.text and ".checkpoint.tmp" in caplog.text
    assert sorted(os.listdir(tmp_path)) == ["adapter", "checkpoint"]


def test_no_checkpoint_at_all_is_none(tmp_path):
    assert recover(tmp_path, LM_FOLLOW) is None


def _run(tmp_path, **kw) -> Run:
    return Run(LMConfig(), run_dir=str(tmp_path / "run"), **kw)


def test_save_atomic_for_any_run_kind_and_a_refused_write(tmp_path, monkeypatch):
    """``Run.save_atomic`` (gym ``policy/``, ``reward_model/``): versioned the same way; a disk
    that fills up mid-save leaves the previous version and says so in one sentence."""
    run = _run(tmp_path)
    run.log({"step": 1})

    def write(text):
        def w(d: Path) -> None:
            d.mkdir()
            (d / "policy.safetensors").write_text(text)
        return w

    run.save_atomic("policy", write("one"))
    real_rename = os.rename

    def full_disk(a, b):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(a))

    monkeypatch.setattr(os, "rename", full_disk)
    with pytest.raises(UserError, match=r"could not save policy in .*No space left on device.*previous policy is kept"):
        run.save_atomic("policy", write("two"))
    monkeypatch.setattr(os, "rename", real_rename)
    assert (run.dir / "policy" / "policy.safetensors").read_text() == "one"
    assert not [e for e in os.listdir(run.dir) if e.startswith(".policy")]  # the temporary is removed
    run.close()


def test_torn_last_metrics_line_is_dropped_on_resume(tmp_path):
    run = _run(tmp_path)
    run.log({"step": 1, "reward": 0.5})
    run.log({"step": 2, "reward": 0.25})
    run.close()
    with open(run.metrics_path, "a") as f:
        f.write('{"step": 3, "rew')  # killed mid-append
    again = _run(tmp_path, resume=True)
    again.truncate_history(2)
    assert [json.loads(x)["step"] for x in again.metrics_path.read_text().splitlines()] == [1, 2]
    again.close()


def test_a_second_run_on_a_locked_directory_is_refused_and_the_lock_goes_with_its_holder(tmp_path):
    first = _run(tmp_path)
    with pytest.raises(UserError, match=r"is in use by another rlhf process \(pid %d\)" % os.getpid()):
        _run(tmp_path, resume=True)
    first.close()
    _run(tmp_path, resume=True).close()  # released: a resume takes it

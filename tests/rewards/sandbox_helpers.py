"""Shared by the sandbox tests: limits, the backend fixture (every backend available here) and the
skip with its reason where a layer does not hold."""
from __future__ import annotations

import pytest

from rlhf.sandbox import Limits, backends, isolation
from rewards import code_tests

FAST = Limits(cpu_s=1, wall_s=3.0, memory_mb=256, file_mb=1, disk_mb=4, processes=8)
# correct programs must not fail on a loaded 2-core machine: a generous wall clock for them
GENEROUS = Limits(cpu_s=2, wall_s=20.0, memory_mb=256, file_mb=1, processes=8)


@pytest.fixture(params=backends())
def backend(request, monkeypatch):
    monkeypatch.setenv("RLHF_SANDBOX_BACKEND", request.param)  # code_tests runs on it too
    return request.param


def require(backend, *layers):
    held = set(isolation(backend))
    if "user" in held:  # not root, in a user namespace: an unprivileged uid of its own, as "uid" gives
        held.add("uid")
    missing = [x for x in layers if x not in held]
    if missing:
        pytest.skip(f"sandbox layers {missing} do not hold here ({backend}): they need root with "
                    "CAP_SYS_ADMIN, or user namespaces (not 'uid', 'cgroup'), and 'cgroup' a writable /sys/fs/cgroup; "
                    "rlhf/sandbox documents this")


@pytest.fixture
def limits(monkeypatch):
    monkeypatch.setattr(code_tests, "limits", FAST)
    return FAST


def io(*pairs):
    return [{"input": i, "output": o} for i, o in pairs]


ADD = io(("1 2\n", "3"), ("10 -4\n", "6"), ("0 0\n", "0"), ("5 5\n", "10"))

"""The code_tests reward and the sandbox's basic limits; the attacks of issue 24 are in
test_sandbox_attacks.py.

Every hostile program carries its own cap (a bounded loop, a bounded allocation, short sleeps), so
that even if a limit failed it could not harm the shared machine. Each one prints, on success, the
exact answer its test case expects, so a score of 1 would mean the attack worked; each must score 0.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import subprocess
import sys
import tempfile
import time

import pytest

import rewards.code as code
from rewards import code_tests
from rlhf.sandbox import Limits, backends, isolation, run_python
from sandbox_helpers import ADD, FAST, GENEROUS, backend, io, limits, require  # noqa: F401 (fixtures)


def test_correct_and_partial_programs(monkeypatch, backend):
    monkeypatch.setattr(code_tests, "limits", GENEROUS)
    right = "Here:\n```python\na, b = map(int, input().split())\nprint(a + b)\n```\n"
    wrong_on_negatives = "```python\na, b = map(int, input().split())\nprint(abs(a) + abs(b))\n```"
    bare = "a, b = map(int, input().split())\nprint(a * b)"  # no fence: the whole text; passes 0 0 only
    crash = "```python\nraise SystemExit(0)\n```"  # exit status 0 without output is no pass
    scores = code_tests(None, [right, wrong_on_negatives, bare, crash, right], [ADD] * 4 + [[]])
    assert scores == [1.0, 0.75, 0.25, 0.0, None]


def test_a_correct_program_using_threads_hashlib_subprocess_json_scores(monkeypatch, backend):
    # on this machine the interpreter lives under /root (0700): the program's uid must still import
    monkeypatch.setattr(code_tests, "limits", GENEROUS)
    # without its own root, the program's uid may be unable to exec an interpreter under /root
    child = ("subprocess.run([sys.executable, '-c', 'print(2)'], capture_output=True, text=True)"
             if "root" in isolation(backend) else "subprocess.CompletedProcess([], 0, '2\\n')")
    prog = ("import hashlib, json, subprocess, sys, threading, tempfile, os\n"
            "a, b = map(int, input().split())\nout = []\n"
            "t = threading.Thread(target=lambda: out.append(a + b))\nt.start()\nt.join()\n"
            f"child = {child}\n"
            "with tempfile.TemporaryFile() as f:\n    f.write(b'x')\n"
            "assert hashlib.sha256(b'').hexdigest().startswith('e3b0') and child.stdout == '2\\n'\n"
            "print(json.loads(json.dumps(out))[0])\n")
    assert code_tests(None, [prog], [ADD]) == [1.0]


def test_tests_column_as_json_and_bad_column(monkeypatch):
    monkeypatch.setattr(code_tests, "limits", GENEROUS)
    assert code_tests(None, ["print(input())"], ['[{"input": "hi", "output": "hi"}]']) == [1.0]
    with pytest.raises(ValueError, match="column 'tests' of row 0 must be a list"):
        code_tests(None, ["print(1)"], [[{"in": "x"}]])


def test_infinite_loop_and_sleep_are_stopped(limits, backend):
    t = time.monotonic()
    busy = "while True:\n    pass\nprint(3)"
    asleep = "import time\nfor _ in range(60):\n    time.sleep(1)\nprint(3)"  # capped at 60 s itself
    assert code_tests(None, [busy, asleep], [ADD[:1]] * 2) == [0.0, 0.0]
    assert time.monotonic() - t < 2 * limits.wall_s + 5  # both ran in parallel, each killed by a limit
    r = run_python(asleep, limits=limits, backend=backend)
    assert r.timed_out and r.returncode is None


def test_fork_bomb_is_bounded(limits, backend):
    require(backend, "uid")
    # at most 64 children, each alive for 3 s, even if every limit failed
    bomb = ("import os, time\nn = 0\nfor _ in range(64):\n    try:\n        pid = os.fork()\n"
            "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(3)\n        os._exit(0)\n"
            "    n += 1\nprint(n, flush=True)\n")
    r = run_python(bomb, limits=limits, backend=backend)
    assert 0 <= int(r.stdout) < limits.processes  # the program itself counts too
    # its children hold stdout: without a PID namespace the call waits for the wall clock
    assert r.returncode == 0 or ("pid" not in r.layers and r.timed_out)
    assert code_tests(None, [bomb], [io(("", "64"))]) == [0.0]


def test_memory_bomb(limits, backend):
    # grabs up to 1 GiB in 64 MiB pieces, even if every limit failed
    bomb = ("got = []\ntry:\n    for _ in range(16):\n        got.append(bytearray(64 << 20))\n"
            "except MemoryError:\n    pass\nprint(len(got) * 64)\n")
    r = run_python(bomb, limits=limits, backend=backend)
    assert r.returncode == 0 and int(r.stdout) < limits.memory_mb
    assert code_tests(None, [bomb], [io(("", "1024"))]) == [0.0]


def test_writing_outside_its_directory(limits, tmp_path, backend):
    require(backend, "uid", "root")
    world = tempfile.mkdtemp(prefix="rlhf-world-")
    os.chmod(world, 0o777)  # even a world-writable directory of the host is out of reach
    targets = [world + "/escape.txt", "/tmp/rlhf-sandbox-escape-test", "/var/tmp/rlhf-escape",
               "/run/lock/rlhf-escape", "/rlhf-escape", "/etc/rlhf-escape", "/proc/1/cwd/../rlhf-escape",
               os.path.dirname(os.__file__) + "/rlhf_escape.py", os.path.expanduser("~/rlhf-escape")]
    writer = ("import os, sys\nok = 0\nfor p in sys.stdin.read().split():\n    for q in (p, 'link'):\n"
              "        try:\n            if q == 'link':\n                os.symlink(p, 'link')\n"
              "            open(q, 'w').write('x')\n            ok += 1\n        except OSError:\n            pass\n"
              "        finally:\n            if os.path.lexists('link'):\n                os.remove('link')\n"
              "open('inside.txt', 'w').write('fine')\nprint(ok, open('inside.txt').read())\n")
    try:
        r = run_python(writer, " ".join(targets), limits, backend=backend)
        assert r.stdout.split() == ["0", "fine"], r.stderr  # nothing outside; its own directory works
        assert code_tests(None, [writer], [io((" ".join(targets), f"{2 * len(targets)} fine"))]) == [0.0]
        assert not any(os.path.exists(p) for p in targets)
    finally:
        for p in targets:
            if p.startswith(world) and os.path.exists(p):
                os.remove(p)
        os.rmdir(world)
    big = "open('big', 'w').write('x' * (4 << 20))\nprint('wrote')"  # past file_mb = 1
    assert code_tests(None, [big], [io(("", "wrote"))]) == [0.0]
    # 16 files of 512 KiB (8 MiB, capped here) do not fit in disk_mb = 4
    many = ("n = 0\ntry:\n    for n in range(16):\n        open(f'f{n}', 'w').write('x' * (512 << 10))\n"
            "    n = 16\nexcept OSError:\n    pass\nprint(n)\n")
    r = run_python(many, limits=limits, backend=backend)
    assert r.returncode == 0 and int(r.stdout) * 512 <= limits.disk_mb << 10
    assert code_tests(None, [many], [io(("", "16"))]) == [0.0]


def test_parent_environment_is_not_readable(limits, monkeypatch, backend):
    secret = "s3cr3t-" + os.urandom(6).hex()
    snoop = ("import os\nfound = [v for v in os.environ.values() if v.startswith('s3cr3t-')]\n"
             "for d in os.listdir('/proc')[:2000]:\n    try:\n"
             "        found += [x.split(b'=', 1)[1].decode()\n"
             "                  for x in open(f'/proc/{d}/environ', 'rb').read().split(b'\\0')\n"
             "                  if x.startswith(b'RLHF_TEST_SECRET=')]\n"
             "    except (OSError, IndexError):\n        pass\nprint(found[0] if found else 'none')\n")
    # /proc/PID/environ holds a process's environment as it was at exec, so the "trainer" here is a
    # process started with the secret; it runs the snoop plainly (a control: the snoop can find it)
    # and in the sandbox
    trainer = ("import subprocess, sys\nfrom rlhf.sandbox import Limits, run_python\n"
               "plain = subprocess.run([sys.executable, '-c', sys.argv[1]], env={}, capture_output=True, text=True)\n"
               "print(plain.stdout.strip())\n"
               f"print(run_python(sys.argv[1], limits=Limits(**{dataclasses.asdict(limits)}), "
               f"backend={backend!r}).stdout.strip())\n")
    env = {**os.environ, "RLHF_TEST_SECRET": secret, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    out = subprocess.run([sys.executable, "-c", trainer, snoop], env=env, capture_output=True, text=True,
                         timeout=60).stdout.split()
    if os.geteuid() == 0:  # a root child can read its parent's /proc/PID/environ: the control finds it
        assert out[0] == secret
    assert out[-1] == "none"
    monkeypatch.setenv("RLHF_TEST_SECRET", secret)  # and nothing is inherited from os.environ
    assert code_tests(None, [snoop], [io(("", secret))]) == [0.0]


# ---- housekeeping --------------------------------------------------------------------------------

def test_no_cgroup_is_left_behind(backend):
    require(backend, "cgroup")
    run_python("import os\nif os.fork() == 0:\n    os.setsid()\nprint(1)", limits=FAST, backend=backend)
    left = glob.glob("/sys/fs/cgroup/**/rlhf-sandbox-%d-*" % os.getpid(), recursive=True)
    assert left == []


def test_bubblewrap_is_used_where_it_works():
    from rlhf.sandbox.bwrap import available
    assert backends() == (("bwrap",) if available() else ()) + ("inhouse",)
    assert backends()[-1] == "inhouse"  # the in-house launcher is always there


def test_output_flood_is_capped():
    r = run_python("import sys\nfor _ in range(10**6):\n    sys.stdout.write('x' * 1000)\n",
                   limits=Limits(cpu_s=2, wall_s=5, output_kb=64))
    assert r.output_truncated and r.returncode is None and len(r.stdout) <= 64 << 10


def test_output_comparison_ignores_trailing_whitespace_only():
    assert code._norm("3  \n\n") == "3" and code._norm(" 3") != "3"
    assert code.extract_program("a\n```python\nx = 1\n```\nb\n```py\nx = 2\n```") == "x = 2\n"

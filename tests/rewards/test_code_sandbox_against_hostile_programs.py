"""The code_tests reward and its sandbox against hostile programs.

Every hostile program carries its own cap (a bounded loop, a bounded allocation, short sleeps), so
that even if a limit failed it could not harm the shared machine. Each one prints, on success, the
exact answer its test case expects, so a score of 1 would mean the attack worked; each must score 0.
"""
from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

import rewards.code as code
from rewards import code_tests
from rlhf.sandbox import Limits, isolation, run_python

FAST = Limits(cpu_s=1, wall_s=2.0, memory_mb=256, file_mb=1, disk_mb=4, processes=8)
# correct programs must not fail on a loaded 2-core machine: a generous wall clock for them
GENEROUS = Limits(cpu_s=2, wall_s=20.0, memory_mb=256, file_mb=1, processes=8)


def need(*layers):
    missing = [x for x in layers if x not in isolation()]
    return pytest.mark.skipif(bool(missing), reason=f"sandbox layers {missing} unavailable here (need root "
                                                   "with CAP_SYS_ADMIN); rlhf/sandbox.py documents this")


@pytest.fixture
def limits(monkeypatch):
    monkeypatch.setattr(code_tests, "limits", FAST)
    return FAST


def io(*pairs):
    return [{"input": i, "output": o} for i, o in pairs]


ADD = io(("1 2\n", "3"), ("10 -4\n", "6"), ("0 0\n", "0"), ("5 5\n", "10"))


def test_correct_and_partial_programs(monkeypatch):
    monkeypatch.setattr(code_tests, "limits", GENEROUS)
    right = "Here:\n```python\na, b = map(int, input().split())\nprint(a + b)\n```\n"
    wrong_on_negatives = "```python\na, b = map(int, input().split())\nprint(abs(a) + abs(b))\n```"
    bare = "a, b = map(int, input().split())\nprint(a * b)"  # no fence: the whole text; passes 0 0 only
    crash = "```python\nraise SystemExit(0)\n```"  # exit status 0 without output is no pass
    scores = code_tests(None, [right, wrong_on_negatives, bare, crash, right], [ADD] * 4 + [[]])
    assert scores == [1.0, 0.75, 0.25, 0.0, None]


def test_tests_column_as_json_and_bad_column(monkeypatch):
    monkeypatch.setattr(code_tests, "limits", GENEROUS)
    assert code_tests(None, ["print(input())"], ['[{"input": "hi", "output": "hi"}]']) == [1.0]
    with pytest.raises(ValueError, match="column 'tests' of row 0 must be a list"):
        code_tests(None, ["print(1)"], [[{"in": "x"}]])


def test_infinite_loop_and_sleep_are_stopped(limits):
    t = time.monotonic()
    busy = "while True:\n    pass\nprint(3)"
    asleep = "import time\nfor _ in range(60):\n    time.sleep(1)\nprint(3)"  # capped at 60 s itself
    assert code_tests(None, [busy, asleep], [ADD[:1]] * 2) == [0.0, 0.0]
    assert time.monotonic() - t < 2 * limits.wall_s + 5  # both ran in parallel, each killed by a limit
    r = run_python(asleep, limits=limits)
    assert r.timed_out and r.returncode is None


@need("uid")
def test_fork_bomb_is_bounded(limits):
    # at most 64 children, each alive for 3 s, even if RLIMIT_NPROC failed
    bomb = ("import os, time\nn = 0\nfor _ in range(64):\n    try:\n        pid = os.fork()\n"
            "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(3)\n        os._exit(0)\n"
            "    n += 1\nprint(n, flush=True)\n")
    r = run_python(bomb, limits=limits)
    assert r.returncode == 0 and 0 <= int(r.stdout) < limits.processes  # the program itself counts too
    assert code_tests(None, [bomb], [io(("", "64"))]) == [0.0]


def test_memory_bomb(limits):
    # grabs up to 1 GiB in 64 MiB pieces, even if RLIMIT_AS failed
    bomb = ("got = []\ntry:\n    for _ in range(16):\n        got.append(bytearray(64 << 20))\n"
            "except MemoryError:\n    pass\nprint(len(got) * 64)\n")
    r = run_python(bomb, limits=limits)
    assert r.returncode == 0 and int(r.stdout) < limits.memory_mb
    assert code_tests(None, [bomb], [io(("", "1024"))]) == [0.0]


@need("uid", "mount")
def test_writing_outside_its_directory(limits, tmp_path):
    targets = [str(tmp_path / "escape.txt"), "/tmp/rlhf-sandbox-escape-test", "/var/tmp/rlhf-escape",
               "/dev/shm/rlhf-escape", os.path.expanduser("~/rlhf-escape")]
    os.chmod(tmp_path, 0o777)  # even a world-writable directory of the test's is out of reach
    writer = ("import sys\nok = 0\nfor p in sys.stdin.read().split():\n    try:\n"
              "        open(p, 'w').write('x')\n        ok += 1\n    except OSError:\n        pass\n"
              "open('inside.txt', 'w').write('fine')\nprint(ok, open('inside.txt').read())\n")
    r = run_python(writer, " ".join(targets), limits)
    assert r.stdout.split() == ["0", "fine"]  # nothing outside; its own directory works
    assert code_tests(None, [writer], [io((" ".join(targets), f"{len(targets)} fine"))]) == [0.0]
    assert not any(os.path.exists(p) for p in targets)
    big = "open('big', 'w').write('x' * (4 << 20))\nprint('wrote')"  # past file_mb = 1
    assert code_tests(None, [big], [io(("", "wrote"))]) == [0.0]
    # 16 files of 512 KiB (8 MiB, capped here) do not fit in disk_mb = 4
    many = ("n = 0\ntry:\n    for n in range(16):\n        open(f'f{n}', 'w').write('x' * (512 << 10))\n"
            "    n = 16\nexcept OSError:\n    pass\nprint(n)\n")
    r = run_python(many, limits=limits)
    assert r.returncode == 0 and int(r.stdout) * 512 <= limits.disk_mb << 10
    assert code_tests(None, [many], [io(("", "16"))]) == [0.0]


def test_parent_environment_is_not_readable(limits, monkeypatch):
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
               f"print(run_python(sys.argv[1], limits=Limits(**{dataclasses.asdict(limits)})).stdout.strip())\n")
    env = {**os.environ, "RLHF_TEST_SECRET": secret, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    out = subprocess.run([sys.executable, "-c", trainer, snoop], env=env, capture_output=True, text=True,
                         timeout=60).stdout.split()
    if os.geteuid() == 0:  # a root child can read its parent's /proc/PID/environ: the control finds it
        assert out[0] == secret
    assert out[-1] == "none"
    monkeypatch.setenv("RLHF_TEST_SECRET", secret)  # and nothing is inherited from os.environ
    assert code_tests(None, [snoop], [io(("", secret))]) == [0.0]


@need("net")
def test_no_network(limits):
    token = "tok-" + os.urandom(6).hex()
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    accepted, stop = [], threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            accepted.append(1)
            conn.sendall(token.encode())
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client = (f"import socket\ntry:\n    s = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
              "    print(s.recv(100).decode())\nexcept OSError as e:\n    print('blocked', e.errno)\n")
    try:
        r = run_python(client, limits=limits)
        assert r.stdout.startswith("blocked")
        assert code_tests(None, [client], [io(("", token))]) == [0.0]
    finally:
        stop.set()
        thread.join()
        server.close()
    assert accepted == []


def test_output_flood_is_capped():
    r = run_python("import sys\nfor _ in range(10**6):\n    sys.stdout.write('x' * 1000)\n",
                   limits=Limits(cpu_s=2, wall_s=5, output_kb=64))
    assert r.output_truncated and r.returncode is None and len(r.stdout) <= 64 << 10


def test_output_comparison_ignores_trailing_whitespace_only():
    assert code._norm("3  \n\n") == "3" and code._norm(" 3") != "3"
    assert code.extract_program("a\n```python\nx = 1\n```\nb\n```py\nx = 2\n```") == "x = 2\n"

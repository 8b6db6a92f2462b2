"""The sandbox against the attacks of issue 24 (DESIGN: "Code a model writes is an adversary"):
outliving the call, exhausting memory or processes, reading the user's files, writing outside its
directory, reaching a socket.

Every hostile program carries its own cap (a bounded loop, a bounded allocation, short sleeps), so
that even if a limit failed it could not harm the shared machine. Each test runs once per backend
available here (``bwrap`` where bubblewrap works, ``inhouse`` always) and is skipped, with the
reason, where the layer it tests does not hold. Where an attack would print the answer of its test
case, it is also scored and must score 0; where it has a control (the same program outside the
sandbox), the control shows the attack works there.
"""
from __future__ import annotations

import glob
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from rewards import code_tests
from rlhf.sandbox import Limits, isolation, run_python
from sandbox_helpers import FAST, backend, io, limits, require  # noqa: F401 (fixtures)


# ---- outliving the call -------------------------------------------------------------------------

def _alive(tag: str) -> list[int]:
    """Host pids whose name (comm) is ``tag``, the dead (X) and zombies (Z) left out."""
    found = []
    for path in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(path) as f:
                head, _, tail = f.read().rpartition(")")
            comm, state = head.split("(", 1)[1], tail.split()[0]
        except (OSError, IndexError):
            continue
        if comm == tag and state not in ("X", "Z"):
            found.append(int(path.split("/")[2]))
    return found


# the daemon names itself TAG (PR_SET_NAME), tells the program it is up, then lives at most 15 s
UP = ("import ctypes\nctypes.CDLL(None).prctl(15, TAG.encode(), 0, 0, 0)\n"
      "if not said:\n    os.write(w, b'u')\n    said = True\n")
DAEMON = {
    "setsid_double_fork_ignoring_sigterm": (
        "if os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
        "        signal.signal(signal.SIGTERM, signal.SIG_IGN)\n        signal.signal(signal.SIGHUP, signal.SIG_IGN)\n"
        "        os.close(1)\n        os.close(2)\n{up8}        time.sleep(15)\n    os._exit(0)\n"),
    "setpgid_child_left_running": (
        "if os.fork() == 0:\n    os.setpgid(0, 0)\n{up4}    time.sleep(15)\n    os._exit(0)\n"),
    "setsid_and_keep_forking": (  # a new session whose processes keep replacing themselves
        "if os.fork() == 0:\n    os.setsid()\n    os.close(1)\n"
        "    for _ in range(150):\n        try:\n            if os.fork():\n                os._exit(0)\n"
        "        except OSError:\n            pass\n{up8}        time.sleep(0.1)\n    os._exit(0)\n"),
    "main_program_times_out_too": (
        "if os.fork() == 0:\n    os.setsid()\n{up4}    time.sleep(15)\n    os._exit(0)\n"),
}
DAEMON_MAIN = ("import os, select, signal, time\nr, w = os.pipe()\nsaid = False\n{body}"
               "if select.select([r], [], [], 5)[0]:\n    print('up', flush=True)\n{tail}")


def _daemon(attack: str, tag: str) -> str:
    indent = lambda n: "".join(" " * n + line + "\n" for line in UP.splitlines())  # noqa: E731
    body = DAEMON[attack].format(up4=indent(4), up8=indent(8))
    tail = "time.sleep(15)\n" if attack == "main_program_times_out_too" else ""
    return f"TAG = {tag!r}\n" + DAEMON_MAIN.format(body=body, tail=tail)


@pytest.mark.parametrize("attack", sorted(DAEMON))
def test_nothing_outlives_the_call(backend, attack):
    require(backend, "uid")
    if not {"pid", "cgroup"} & set(isolation(backend)):
        pytest.skip("neither a PID namespace nor a cgroup holds here; only the uid-wide kill does")
    tag = "rlhfx" + os.urandom(4).hex()
    t = time.monotonic()
    r = run_python(_daemon(attack, tag), limits=FAST, backend=backend)
    assert time.monotonic() - t < FAST.wall_s + 5
    assert r.stdout == "up\n", r.stderr  # the daemon ran
    # a process SIGKILLed by the call may still be leaving the kernel's tables: give it 0.3 s
    left = _alive(tag)
    for _ in range(30):
        if not left:
            break
        time.sleep(0.01)
        left = _alive(tag)
    assert left == []
    time.sleep(0.5)  # nothing left to fork a new one either
    assert _alive(tag) == []


def test_thread_bomb_is_bounded_by_the_pids_cap(backend):
    require(backend, "cgroup")
    bomb = ("import threading, time\nn = 0\nfor _ in range(64):\n    try:\n"
            "        threading.Thread(target=time.sleep, args=(2,), daemon=True).start()\n"
            "    except RuntimeError:\n        break\n    n += 1\nprint(n, flush=True)\n")
    r = run_python(bomb, limits=FAST, backend=backend)
    assert r.returncode == 0 and int(r.stdout) < FAST.processes


# ---- memory: bounded for the run, not per process --------------------------------------------

TOUCH = {  # each child takes 48 MiB (every page written) and says so
    "heap": "x = bytearray(b'\\1') * (48 << 20)\n",
    "mmap_shared": "import mmap\nx = mmap.mmap(-1, 48 << 20)\nfor _ in range(48):\n    x.write(b'\\1' * (1 << 20))\n",
}
# the parent counts the children that said so and are still alive (holding it) 2.5 s later
CHILDREN = ("import os, time\nr, w = os.pipe()\npids = []\nfor _ in range(6):\n    try:\n        pid = os.fork()\n"
            "    except OSError:\n        break\n    if pid == 0:\n        try:\n{touch}"
            "            os.write(w, b'k')\n            time.sleep(5)\n        finally:\n            os._exit(0)\n"
            "    pids.append(pid)\n"
            "os.close(w)\ntime.sleep(2.5)\nos.set_blocking(r, False)\ntry:\n    said = len(os.read(r, 16))\n"
            "except BlockingIOError:\n    said = 0\nalive = sum(os.waitpid(p, os.WNOHANG) == (0, 0) for p in pids)\n"
            "print(min(said, alive) * 48, flush=True)\n")


@pytest.mark.parametrize("kind", sorted(TOUCH))
def test_many_children_share_one_memory_bound(backend, kind):
    require(backend, "cgroup")
    prog = CHILDREN.format(touch="".join("            " + line + "\n" for line in TOUCH[kind].splitlines()))
    limits = Limits(cpu_s=2, wall_s=8, memory_mb=96, processes=8, disk_mb=4)
    r = run_python(prog, limits=limits, backend=backend)
    assert r.stdout.strip(), r.stderr  # the program itself lived to count
    assert int(r.stdout) <= limits.memory_mb  # 6 x 48 MiB = 288 would mean a per-process bound only


def _host_shmem_mb() -> float:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Shmem:")) / 1024


SYSV = ("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nlibc.shmat.restype = ctypes.c_void_p\n"
        "n = 0\nfor _ in range(4):\n    sid = libc.shmget(0, 50 << 20, 0o1600)\n    if sid < 0:\n        break\n"
        "    addr = libc.shmat(sid, None, 0)\n    if addr in (None, ctypes.c_void_p(-1).value):\n        break\n"
        "    ctypes.memset(addr, 1, 50 << 20)\n    libc.shmdt(ctypes.c_void_p(addr))\n    n += 1\n"
        "    print(n * 50, flush=True)\n")


def test_system_v_shared_memory_is_bounded_and_dies_with_the_run(backend):
    require(backend, "cgroup", "ipc")
    before = _host_shmem_mb()
    r = run_python(SYSV, limits=Limits(cpu_s=2, wall_s=8, memory_mb=96, processes=8), backend=backend)
    held = [int(x) for x in r.stdout.split()]
    assert not held or held[-1] <= 96, r.stdout  # 200 MiB of segments would mean no run-wide bound
    time.sleep(0.2)
    assert _host_shmem_mb() - before < 100  # segments left (detached, not removed) would stay 200 MiB


def test_posix_shared_memory_is_a_small_private_tmpfs(backend):
    require(backend, "root")
    tag = "rlhf-shm-" + os.urandom(4).hex()
    # 4 files of 50 MiB, written 1 MiB at a time (unbuffered), counted as written
    prog = (f"mb = 0\ntry:\n    for n in range(4):\n        with open('/dev/shm/{tag}-%d' % n, 'wb', buffering=0) as f:\n"
            "            for _ in range(50):\n                f.write(b'x' * (1 << 20))\n                mb += 1\n"
            "except OSError:\n    pass\nprint(mb)\n")
    limits = Limits(cpu_s=2, wall_s=5, memory_mb=256, file_mb=64, disk_mb=4)  # no file limit in the way
    r = run_python(prog, limits=limits, backend=backend)
    assert 0 < int(r.stdout) <= limits.disk_mb, r.stderr  # /dev/shm is a tmpfs of disk_mb of its own
    assert not glob.glob(f"/dev/shm/{tag}*")  # and none of it lands in the host's /dev/shm


# ---- the file system: a minimal read-only root --------------------------------------------------

READER = ("import os, sys\nread = []\nfor p in sys.stdin.read().split():\n    for q in (p, 'link'):\n"
          "        try:\n            if q == 'link':\n                os.symlink(p, 'link')\n"
          "            with open(q, 'rb') as f:\n                read.append(f.read(4096))\n"
          "        except OSError:\n            pass\n        finally:\n            if os.path.lexists('link'):\n"
          "                os.remove('link')\n"
          "print(b''.join(read).decode('utf-8', 'replace'))\n")


@pytest.fixture
def dataset():
    """A world-readable dataset in a world-readable directory, holding the answer."""
    d = tempfile.mkdtemp(prefix="rlhf-dataset-")
    os.chmod(d, 0o755)
    answer = "answer-" + os.urandom(6).hex()
    path = os.path.join(d, "tests.jsonl")
    with open(path, "w") as f:
        f.write(answer + "\n")
    os.chmod(path, 0o644)
    yield path, answer
    os.remove(path)
    os.rmdir(d)


def test_world_readable_files_are_not_there(backend, dataset, monkeypatch):
    require(backend, "root", "uid")
    path, answer = dataset
    # the attack works without the sandbox: a plain process reads the dataset
    plain = subprocess.run([sys.executable, "-c", READER], input=path, capture_output=True, text=True)
    assert answer in plain.stdout
    monkeypatch.setattr(code_tests, "limits", FAST)
    assert code_tests(None, [READER], [io((path, answer))]) == [0.0]
    here = os.path.abspath(__file__)
    targets = [path, here, os.path.dirname(here) + "/../README.md", "/etc/passwd", "/etc/hostname",
               "/etc/hosts", "/root/.bashrc", "/root/.profile", "/proc/1/root" + path, "/proc/self/root" + path,
               "/proc/1/cwd/prog.py", "/sys/kernel/hostname", "/proc/" + str(os.getpid()) + "/environ"]
    r = run_python(READER, " ".join(targets), FAST, backend=backend)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ""


def test_the_root_holds_only_what_python_needs(backend):
    require(backend, "root")
    prog = ("import os\nfor d in ('/', '/etc', '/dev'):\n    print(d, *sorted(os.listdir(d)))\n"
            "print('pids', *sorted(p for p in os.listdir('/proc') if p.isdigit()))\n")
    r = run_python(prog, limits=FAST, backend=backend)
    lines = dict(line.split(" ", 1) for line in r.stdout.splitlines())
    top = set(lines["/"].split())
    assert not top & {"home", "tmp", "var", "sys", "run", "mnt", "opt", "srv", "boot", "media", "work" + "x"}
    assert top <= {"proc", "work", "dev", "usr", "root", "lib", "lib64", "lib32", "etc", "opt", "bin"} | \
        {p.split("/")[1] for p in [sys.base_prefix]}
    assert set(lines["/etc"].split()) <= {"ld.so.cache", "localtime"}
    assert not {"sda", "mem", "kmsg", "nvme0", "nvidia0"} & set(lines["/dev"].split())
    assert len(lines["pids"].split()) <= 3  # its own PID namespace: init, the program, nothing else


# ---- sockets -------------------------------------------------------------------------------------

class Server:
    """A listening socket that hands a token to whoever connects (so a connection would score)."""

    def __init__(self, family, address):
        self.token = "tok-" + os.urandom(6).hex()
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.bind(address)
        self.sock.listen(4)
        self.sock.settimeout(0.2)
        self.accepted, self.stop = [], threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted.append(1)
            conn.sendall(self.token.encode())
            conn.close()

    def close(self):
        self.stop.set()
        self.thread.join()
        self.sock.close()


CLIENT = ("import socket\nfamily, address = {family}, {address!r}\ntry:\n"
          "    s = socket.socket(family, socket.SOCK_STREAM)\n    s.settimeout(1)\n    s.connect(address)\n"
          "    print(s.recv(100).decode())\nexcept OSError as e:\n    print('blocked', e.errno)\n")


def _sockets():
    d = tempfile.mkdtemp(prefix="rlhf-sock-")
    os.chmod(d, 0o755)
    path = os.path.join(d, "s")
    yield "tcp_loopback", socket.AF_INET, ("127.0.0.1", 0), "net"
    yield "unix_socket_file", socket.AF_UNIX, path, "root"
    yield "abstract_unix_socket", socket.AF_UNIX, "\0rlhf-test-" + os.urandom(4).hex(), "net"


@pytest.mark.parametrize("case", ["tcp_loopback", "unix_socket_file", "abstract_unix_socket"])
def test_no_socket_reaches_the_host(limits, backend, case):
    _, family, address, layer = next(s for s in _sockets() if s[0] == case)
    require(backend, layer, "uid")
    server = Server(family, address)
    if family == socket.AF_UNIX and not address.startswith("\0"):
        os.chmod(address, 0o777)
    bound = server.sock.getsockname()
    client = CLIENT.format(family=int(family), address=bound if family == socket.AF_INET else address)
    try:
        r = run_python(client, limits=limits, backend=backend)
        assert r.stdout.startswith("blocked"), r.stdout + r.stderr
        assert code_tests(None, [client], [io(("", server.token))]) == [0.0]
    finally:
        server.close()
        if family == socket.AF_UNIX and not address.startswith("\0"):
            os.remove(address)
            os.rmdir(os.path.dirname(address))
    assert server.accepted == []


def test_the_program_holds_no_privilege(backend):
    require(backend, "uid")
    prog = ("import json, os\nst = dict(l.split(':', 1) for l in open('/proc/self/status'))\n"
            "print(json.dumps([os.getuid(), os.getgid(), os.getgroups(), int(st['CapEff'], 16),\n"
            "                  int(st['CapPrm'], 16), int(st['NoNewPrivs'])]))\n")
    r = run_python(prog, limits=FAST, backend=backend)
    uid, gid, groups, eff, prm, nnp = json.loads(r.stdout)
    assert uid != 0 and (eff, prm, nnp) == (0, 0, 1)
    if "user" not in r.layers:  # root's sandbox: a fresh uid and gid, no groups (a user namespace maps one)
        assert uid == gid and uid != os.getuid() and groups == []


def test_no_socket_family_outside_the_network_namespace(backend):
    require(backend, "seccomp")
    if os.uname().machine != "x86_64":
        pytest.skip("the syscall numbers below are x86_64's")
    # AF_VSOCK (40) belongs to no network namespace: in a VM (this one has /dev/vsock) it reaches the
    # host; AF_PACKET (17) and AF_ALG (38) are not needed either; io_uring opens sockets past seccomp
    prog = ("import ctypes, errno, socket\nout = []\nfor fam in (40, 17, 38):\n    try:\n"
            "        socket.socket(fam, socket.SOCK_STREAM if fam == 40 else socket.SOCK_RAW if fam == 17 else 5)\n"
            "        out.append('open')\n    except OSError as e:\n        out.append(errno.errorcode[e.errno])\n"
            "libc = ctypes.CDLL(None, use_errno=True)\nparams = ctypes.create_string_buffer(120)\n"
            "fd = libc.syscall(425, 4, params)\nout.append('uring' if fd >= 0 else errno.errorcode[ctypes.get_errno()])\n"
            "key = libc.syscall(250, 0, -3, 0)\n"  # KEYCTL_GET_KEYRING_ID of the session keyring (x86_64)
            "out.append('keyring' if key >= 0 else errno.errorcode[ctypes.get_errno()])\n"
            "print(*out)\n")
    r = run_python(prog, limits=FAST, backend=backend)
    assert r.stdout.split() == ["EAFNOSUPPORT"] * 3 + ["ENOSYS"] * 2, r.stdout + r.stderr

"""The sandbox's launcher: run by the trainer as ``python -I -S _launcher.py CONFIG`` (as root where
the trainer is root) in the run's working directory; it never imports ``rlhf``.

``launch``: joins the run's cgroup, makes new namespaces (mount, pid, net, ipc, uts), forks the
init of the new pid namespace (``init``), which builds the read-only root (``build_root``), forks
the program (``become_program``) and exits when the program exits, so that the kernel kills every
process left in the namespace. With ``CONFIG["backend"] == "bwrap"`` the launcher execs bubblewrap
instead, and bubblewrap runs ``python -I -S -c <this file> drop CONFIG`` to become the program.
"""
import ctypes
import json
import os
import resource
import signal
import sys

CLONE = {"mount": 0x20000, "uts": 0x4000000, "ipc": 0x8000000, "net": 0x40000000, "pid": 0x20000000}
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = (
    1, 2, 4, 8, 32, 4096, 16384, 1 << 18)
PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}
# seccomp: (AUDIT_ARCH, socket, syscalls that fail with ENOSYS: io_uring_setup/enter/register, add_key,
# request_key, keyctl (the trainer's session keyring is inherited), bpf, userfaultfd, perf_event_open);
# socket families kept: AF_UNIX, AF_INET, AF_INET6
SECCOMP_ARCH = {"x86_64": (0xC000003E, 41, (425, 426, 427, 248, 249, 250, 321, 323, 298)),
                "aarch64": (0xC00000B7, 198, (425, 426, 427, 217, 218, 219, 280, 282, 241))}
SOCKET_FAMILIES = (1, 2, 10)
WORK = "/work"
USER_UID = 1000  # the program's uid inside a user namespace (not root)
libc = ctypes.CDLL(None, use_errno=True)


def _check(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, "%s: %s" % (what, os.strerror(err)))


def _mount(src, dst, fstype=None, flags=0, data=None):
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(libc.mount(enc(src), enc(dst), enc(fstype), flags, enc(data)), "mount %s on %s" % (src, dst))


def _bind_ro(src, dst, dev=False):
    if os.path.isdir(src):
        os.makedirs(dst, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        open(dst, "a").close()
    _mount(src, dst, None, MS_BIND | MS_REC)
    flags = MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | (0 if dev else MS_NODEV)
    keep = os.statvfs(dst).f_flag & (MS_NOSUID | MS_NODEV | MS_NOEXEC)  # locked in a user namespace
    _mount(None, dst, None, flags | keep)


def build_root(cfg, program):
    """Pivot into a fresh tmpfs holding read-only binds of ``cfg["binds"]``, the devices, a /proc of
    the new pid namespace, a size-limited /dev/shm and the program's own writable tmpfs ``/work``."""
    L, uid = cfg["limits"], cfg["owner"]
    _mount("none", "/", None, MS_REC | MS_PRIVATE)
    new = os.getcwd()
    _mount("tmpfs", new, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,nr_inodes=4096,mode=755")
    os.umask(0o022)
    for src, dst in cfg["binds"]:
        if os.path.exists(src):
            _bind_ro(src, new + dst)
    for d in cfg["hide"]:
        _mount("tmpfs", new + d, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV, "size=4k,mode=755")
    for dev in cfg["devices"]:
        _bind_ro(dev, new + dev, dev=True)
    owner = "uid=%d,gid=%d" % (uid, uid)
    for d, size in ((WORK, L["disk_mb"]), ("/dev/shm", L["disk_mb"])):
        os.makedirs(new + d, exist_ok=True)
        opts = "size=%dm,nr_inodes=4096,mode=700,%s" % (size, owner)
        _mount("tmpfs", new + d, "tmpfs", MS_NOSUID | MS_NODEV, opts)
    with open(new + WORK + "/prog.py", "wb") as f:
        f.write(program)
    os.chown(new + WORK + "/prog.py", uid, uid)
    os.makedirs(new + "/proc", exist_ok=True)
    _mount("proc", new + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    os.chdir(new)
    _check(libc.syscall(PIVOT_ROOT[os.uname().machine], b".", b"."), "pivot_root")
    _check(libc.umount2(b".", 2), "detaching the old root")  # MNT_DETACH
    os.chdir("/")
    _mount(None, "/", None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chdir(WORK)


def become_program(cfg, layers, in_root):
    """Limits, then the program's uid (no groups, no new privileges), then exec the program."""
    L, uid = cfg["limits"], cfg["uid"]
    for res, v in ((resource.RLIMIT_CPU, L["cpu_s"]), (resource.RLIMIT_AS, L["memory_mb"] << 20),
                   (resource.RLIMIT_FSIZE, L["file_mb"] << 20), (resource.RLIMIT_NOFILE, 64),
                   (resource.RLIMIT_CORE, 0), (resource.RLIMIT_MSGQUEUE, 1 << 16)):
        resource.setrlimit(res, (v, v))
    if not in_root:  # the interpreter's files may be unreadable for the uid: import while root
        _preload(cfg["preload"])
    if "user" in layers:  # uid USER_UID of a user namespace: its capabilities go at exec
        resource.setrlimit(resource.RLIMIT_NPROC, (L["processes"], L["processes"]))
    elif uid is not None:
        resource.setrlimit(resource.RLIMIT_NPROC, (L["processes"], L["processes"]))
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        layers.append("uid")
    libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
    if seccomp():
        layers.append("seccomp")
    sys.stderr.write("\0layers:" + ",".join(layers) + "\n")
    sys.stderr.flush()
    if in_root or "user" in layers:  # exec also drops a user namespace's capabilities
        os.execv(cfg["exe"], [cfg["exe"], "-I", "-S", "prog.py"])
    _run_here(cfg)  # no private root: the interpreter's files may be unreadable for the uid


def seccomp():
    """A seccomp filter: socket() of any family but unix and IP fails (AF_VSOCK reaches a VM's host
    whatever the network namespace); io_uring (which opens sockets past seccomp), the keyrings, bpf,
    userfaultfd and perf_event_open are absent; another ABI's syscalls (x32, i386) fail. False where
    the architecture is not known here."""
    if os.uname().machine not in SECCOMP_ARCH:
        return False
    arch, sock, denied = SECCOMP_ARCH[os.uname().machine]
    allow, kill = 0x7FFF0000, 0x80000000
    errno = lambda e: 0x00050000 | e  # noqa: E731
    ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06
    # (code, jt, jf, k); jumps are relative to the next instruction
    prog = [(ld, 0, 0, 4), (jeq, 1, 0, arch), (ret, 0, 0, kill), (ld, 0, 0, 0),
            (jge, 0, 1, 0x40000000), (ret, 0, 0, errno(38))]  # ENOSYS for x32
    for nr in denied:
        prog += [(jeq, 0, 1, nr), (ret, 0, 0, errno(38))]
    prog += [(jeq, 0, 1 + len(SOCKET_FAMILIES) + 1, sock), (ld, 0, 0, 16)]
    prog += [(jeq, len(SOCKET_FAMILIES) - i, 0, fam) for i, fam in enumerate(SOCKET_FAMILIES)]
    prog += [(ret, 0, 0, errno(97)), (ret, 0, 0, allow)]  # EAFNOSUPPORT

    class Filter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]

    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Filter))]

    filters = (Filter * len(prog))(*[Filter(*ins) for ins in prog])
    fprog = Prog(len(prog), filters)
    _check(libc.prctl(22, 2, ctypes.byref(fprog), 0, 0), "installing the seccomp filter")
    return True


def _preload(modules):
    for m in modules:
        try:
            __import__(m)
        except ImportError:
            pass


def _run_here(cfg):
    """The program in this process (the modules of ``cfg["preload"]`` are imported already)."""
    with open("prog.py", encoding="utf-8", errors="replace") as f:
        code = compile(f.read(), "prog.py", "exec")
    sys.argv = ["prog.py"]
    status = 0
    try:
        exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        import traceback
        traceback.print_exc()
        status = 1
    try:
        sys.stdout.flush()
    except BaseException:
        status = status or 1
    os._exit(status)


def _exit_like(status):
    code = os.waitstatus_to_exitcode(status)
    os._exit(code if code >= 0 else 128 - code)


def init(cfg, layers):
    """PID 1 of the namespace (where there is one): fork the program, reap orphans, and exit with the
    program's status as soon as it exits; the kernel then kills whatever it left behind."""
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: die with the launcher
    in_root = False
    if "mount" in layers and "pid" in layers and cfg["owner"] is not None:
        with open("prog.py", "rb") as f:
            program = f.read()
        build_root(cfg, program)
        layers.append("root")
        in_root = True
    pid = os.fork()
    if pid == 0:
        try:
            become_program(cfg, layers, in_root)
        except BaseException as exc:
            sys.stderr.write("\0sandbox setup failed: %r\n" % (exc,))
            sys.stderr.flush()
        os._exit(125)
    while True:
        done, status = os.waitpid(-1, 0)
        if done == pid:
            _exit_like(status)


def _user_namespace():
    """Not root: a user namespace where our uid is USER_UID, which gives this process (not the
    program: its uid is not 0, so exec drops them) the capabilities to make the other namespaces."""
    uid, gid = os.geteuid(), os.getegid()
    if libc.unshare(0x10000000) != 0:  # CLONE_NEWUSER
        return False
    for path, text in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", "%d %d 1" % (USER_UID, uid)),
                       ("/proc/self/gid_map", "%d %d 1" % (USER_UID, gid))):
        with open(path, "w") as f:
            f.write(text)
    return True


def launch(cfg):
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)
    for f in cfg["cgroup_procs"]:
        with open(f, "w") as fh:
            fh.write(str(os.getpid()))
    if cfg["backend"] == "bwrap":
        os.execv(cfg["bwrap"][0], cfg["bwrap"])
    layers = []
    cfg["owner"] = cfg["uid"]
    if cfg["uid"] is None and cfg.get("userns") and _user_namespace():
        layers, cfg["owner"] = ["user"], USER_UID
    if cfg["owner"] is not None:
        if libc.unshare(sum(CLONE.values())) == 0:
            layers += list(CLONE)
        else:
            layers += [n for n, flag in CLONE.items() if libc.unshare(flag) == 0]
    try:
        pid = os.fork()
    except OSError as exc:
        sys.stderr.write("\0sandbox setup failed: %r\n" % (exc,))
        os._exit(125)
    if pid == 0:
        try:
            init(cfg, layers)
        except BaseException as exc:
            sys.stderr.write("\0sandbox setup failed: %r\n" % (exc,))
            sys.stderr.flush()
        os._exit(125)
    _exit_like(os.waitpid(pid, 0)[1])


if __name__ == "__main__":
    if sys.argv[1] == "drop":  # inside bubblewrap: namespaces and root are made; become the program
        try:
            CFG = json.loads(sys.argv[2])
            CFG["owner"] = CFG["uid"]
            for d in (WORK, "/dev/shm"):
                os.chown(d, CFG["uid"], CFG["uid"])
                os.chmod(d, 0o700)
            become_program(CFG, ["net", "mount", "pid", "ipc", "uts", "root"], True)
        except BaseException as exc:
            sys.stderr.write("\0sandbox setup failed: %r\n" % (exc,))
            sys.stderr.flush()
        os._exit(125)
    launch(json.loads(sys.argv[1]))

"""What a sandboxed run may use, and what it gives back."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    cpu_s: int = 2            # RLIMIT_CPU (whole seconds; SIGKILL when reached)
    wall_s: float = 5.0       # wall-clock kill (covers sleeping / blocked programs and startup)
    memory_mb: int = 512      # all the run's processes together (cgroup); also RLIMIT_AS of each
    file_mb: int = 16         # RLIMIT_FSIZE (one file)
    disk_mb: int = 64         # all files together: its directory, and /dev/shm, are tmpfs of this size
    processes: int = 16       # RLIMIT_NPROC of the program's uid, and the cgroup's pids.max (+ launcher)
    output_kb: int = 256      # stdout kept; more kills the program


@dataclass
class Result:
    stdout: str
    returncode: int | None    # None when killed by the wall clock or the output cap
    timed_out: bool
    output_truncated: bool
    stderr: str = ""
    layers: tuple[str, ...] = ()
    backend: str = ""

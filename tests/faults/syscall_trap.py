"""Holding a daemon at one system call, for a kill -9 that lands exactly there.

``SyscallTrap(pid, "rename", 2)`` attaches strace to the daemon and makes the second
``rename`` it makes wait (20 s) before it runs; ``wait_held`` returns once a thread of the
daemon sits in that call, and the test then kills the daemon: everything before that call
happened, nothing after it. A random delay hits a few-millisecond window (a rename between
two files, a test copy's deletion) once in hundreds of tries; this hits it every time.
``paths`` counts only the calls on those files (strace -P): the 5th ``pwrite64`` into a disk
is the 5th block a roll-back writes there, whatever else the daemon writes meanwhile.
With ``error``, the call fails instead (an I/O error at the n-th write into a file).
Fault injection only: nothing of the daemon's code knows about it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

NUMBERS = {"rename": 82, "unlink": 87, "rmdir": 84, "fsync": 74, "pwrite64": 18, "ftruncate": 77,
           "fallocate": 285, "unlinkat": 263}  # x86_64


def available() -> bool:
    return bool(shutil.which("strace")) and Path("/proc/self/syscall").exists()


class SyscallTrap:
    def __init__(self, pid: int, syscall: str, nth: int | str, hold_us: int = 20_000_000, paths: tuple[Path, ...] = (),
                 error: str | None = None):
        """``nth``: strace's ``when`` (``3``: the third call; ``3+``: the third and every later
        one). ``error`` (``EIO``): the call fails with that error instead of waiting."""
        self.pid, self.syscall, self.nth = pid, syscall, nth
        action = f"error={error}" if error else f"delay_enter={hold_us}"
        self._argv = ["strace", "-f", "-qq", "-e", f"trace={syscall}", "-e",
                      f"inject={syscall}:{action}:when={nth}", "-p", str(pid)]
        for path in paths:  # a file need not exist yet: strace compares the path a descriptor names
            self._argv += ["-P", str(path)]
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> SyscallTrap:
        self._proc = subprocess.Popen(self._argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while "TracerPid:\t0" in Path(f"/proc/{self.pid}/status").read_text():
            if time.monotonic() > deadline or self._proc.poll() is not None:
                raise RuntimeError(f"strace could not attach to {self.pid}")
            time.sleep(0.02)
        return self

    def held(self) -> bool:
        """A thread of the daemon waits at the trapped call now."""
        want = str(NUMBERS[self.syscall])
        for task in Path(f"/proc/{self.pid}/task").iterdir():
            try:
                if (task / "syscall").read_text().split()[0] == want and \
                        "tracing stop" in (task / "status").read_text():
                    return True
            except (OSError, IndexError):
                continue
        return False

    def wait_held(self, done, timeout: float = 60) -> bool:
        """Until the call is held (True) or ``done()`` says the operation ended first (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.held():
                return True
            if done():
                return False
            time.sleep(0.01)
        return False

    def kill_tracee(self) -> None:
        """SIGKILL the daemon where it is held: the held call never runs (the kernel skips a
        system call whose thread has a fatal signal pending when its tracer lets it go).
        Reap it after the ``with`` block: a traced process is reaped once strace is gone."""
        os.kill(self.pid, signal.SIGKILL)

    def __exit__(self, *exc) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(10)

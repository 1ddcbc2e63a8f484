"""What a daemon owns alone: its state dir and its management socket.

Two daemons on one state dir would both run cycles for the same VMs and write the same
catalog, maps and copies; a lock (``flock`` on ``<state_dir>/daemon.lock``, released by the
kernel when the process ends, however it ends) lets only the first one start. The socket
is a path anyone can unlink or bind again: a daemon never takes a socket another process
answers on, and on its way out removes the path only while it is still the very socket
it bound (same device and inode)."""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
from pathlib import Path

from .errors import ConfigError

LOCK_FILE = "daemon.lock"
MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes, the last one a NUL


class StateDirLock:
    """An exclusive hold on a state dir for this process's lifetime (or until ``release``)."""

    def __init__(self, state_dir: Path):
        self.path = state_dir / LOCK_FILE
        self._fd = -1

    def acquire(self) -> None:
        """Take the lock and write this pid into it; raises ConfigError (exit 2) naming the
        pid that holds it. O_CLOEXEC: hooks and other children never inherit the hold."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise ConfigError(f"state_dir: cannot lock {self.path}: {e.strerror}") from None
            raise ConfigError(f"state dir {self.path.parent} is in use by replicad pid {holder}",
                              hint="one daemon per state dir: stop that one first, or give this one its own "
                                   "state_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class ManagementSocket:
    """The daemon's unix socket path: claimed only when nobody answers there, removed only
    while it is still ours."""

    def __init__(self, path: Path):
        self.path = path
        self._ident: tuple[int, int] | None = None

    def claim(self) -> None:
        """Make the path free for ``bind``: a stale socket (nobody listening) is removed; a
        live one, or anything that is not a socket, is refused with ConfigError (exit 2)."""
        if len(os.fsencode(self.path)) > MAX_SOCKET_PATH:
            raise ConfigError(f"management.socket: {self.path} is too long for a unix socket "
                              f"({MAX_SOCKET_PATH} bytes at most)", hint="choose a shorter path")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"management.socket: cannot create {self.path.parent}: {e.strerror}") from None
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError(f"management.socket: {self.path} exists and is not a socket")
        if answers(self.path):
            raise ConfigError(f"management.socket: {self.path} is in use by another daemon",
                              hint="give each daemon its own management.socket")
        self.path.unlink(missing_ok=True)

    def bound(self) -> None:
        """Record the socket just bound at the path as ours, owner and group only."""
        os.chmod(self.path, 0o660)
        st = os.lstat(self.path)
        self._ident = (st.st_dev, st.st_ino)

    def ours(self) -> bool:
        if self._ident is None:
            return False
        try:
            st = os.lstat(self.path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self._ident

    def missing(self) -> bool:
        return not os.path.lexists(self.path)

    def remove(self) -> bool:
        """Unlink the path if it is still the socket this process bound; True if it did."""
        if not self.ours():
            return False
        try:
            self.path.unlink()
        except OSError:
            return False
        self._ident = None
        return True


def answers(path: Path) -> bool:
    """Whether a process accepts connections on the unix socket at ``path``."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()

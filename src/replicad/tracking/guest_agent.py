"""The QEMU guest agent (`qemu-ga` inside the guest), reached on the host side of its
virtio-serial port (a unix socket chardev): it freezes the guest's filesystems for the
instant of a capture, so the point is `application`-consistent without hooks.

Protocol (QEMU's guest agent documentation): JSON commands, one per line; a session starts
with ``guest-sync-delimited``, whose answer is preceded by a 0xFF byte, to skip whatever a
previous client left unread. ``guest-fsfreeze-freeze`` flushes and freezes every mounted
filesystem that can be (returns how many); ``guest-fsfreeze-thaw`` undoes it. The agent
does not thaw by itself when the host side goes away, so the thaw is always sent, and
retried once on a new connection if the first try fails."""

from __future__ import annotations

import json
import secrets
import socket
from typing import Any

FREEZE_TIMEOUT = 30.0   # guest-fsfreeze-freeze waits for the guest's filesystems to flush


class GuestAgentError(Exception):
    """The agent cannot be reached or refused; the message says which command."""


class GuestAgent:
    def __init__(self, path: str, timeout: float = FREEZE_TIMEOUT):
        self.path, self.timeout = path, timeout

    def _session(self) -> tuple[socket.socket, Any]:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self.path)
        except OSError as e:
            s.close()
            raise GuestAgentError(f"cannot reach the guest agent at {self.path}: {e.strerror or e}") from None
        f = s.makefile("rwb")
        token = secrets.randbelow(1 << 31)
        self._send(f, "guest-sync-delimited", {"id": token})
        while True:  # skip what an earlier client left unread, up to the delimited answer
            line = self._line(f)
            if line.startswith(b"\xff") or b"\xff" in line:
                line = line[line.index(b"\xff") + 1:]
                if line.strip() and json.loads(line).get("return") == token:
                    return s, f

    @staticmethod
    def _send(f: Any, cmd: str, args: dict[str, Any] | None = None) -> None:
        f.write(json.dumps({"execute": cmd, **({"arguments": args} if args else {})}).encode() + b"\n")
        f.flush()

    def _line(self, f: Any) -> bytes:
        try:
            line: bytes = f.readline()
        except OSError as e:
            raise GuestAgentError(f"the guest agent at {self.path} did not answer: {e}") from None
        if not line:
            raise GuestAgentError(f"the guest agent at {self.path} closed the connection")
        return line

    def call(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        s, f = self._session()
        try:
            self._send(f, cmd, args)
            while True:
                line = self._line(f).lstrip(b"\xff").strip()
                if not line:
                    continue
                doc = json.loads(line)
                if "error" in doc:
                    raise GuestAgentError(f"the guest agent refused {cmd}: {doc['error'].get('desc', doc['error'])}")
                if "return" in doc:
                    return doc["return"]
        finally:
            f.close()
            s.close()

    def freeze(self) -> int:
        """Freeze the guest's filesystems; returns how many."""
        return int(self.call("guest-fsfreeze-freeze"))

    def thaw(self) -> None:
        """Thaw, once more on a new connection if the first try failed."""
        try:
            self.call("guest-fsfreeze-thaw")
        except GuestAgentError:
            self.call("guest-fsfreeze-thaw")

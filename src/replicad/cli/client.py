"""The CLI's client of the management API over the daemon's unix socket.

Plain sockets and a few lines of HTTP/1.1 rather than http.client: a CLI call is one short
request, and importing http.client (email parsing and all) cost every call ~25 ms. Answers
come with Content-Length, or chunked for the NDJSON progress of long operations."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any, Protocol

from ..errors import DaemonUnreachable, ReplicadError

TIMEOUT = 30
MAX_HEAD = 64 * 1024


class _Answer:
    """One HTTP answer read from a socket: status, headers, then the body on demand."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self._buf = bytearray()
        while b"\r\n\r\n" not in self._buf:
            self._fill()
            if len(self._buf) > MAX_HEAD:
                raise OSError("answer headers too large")
        head, _, rest = bytes(self._buf).partition(b"\r\n\r\n")
        self._buf = bytearray(rest)
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split(" ", 2)[1])
        self.headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            self.headers[k.strip().lower()] = v.strip()
        self.chunked = self.headers.get("transfer-encoding", "").lower() == "chunked"

    def _fill(self) -> None:
        got = self._sock.recv(65536)
        if not got:
            raise ConnectionError("the daemon closed the connection")
        self._buf += got

    def chunks(self) -> Iterator[bytes]:
        if not self.chunked:
            length = int(self.headers.get("content-length", "0") or 0)
            while len(self._buf) < length:
                self._fill()
            yield bytes(self._buf[:length])
            return
        while True:
            while b"\r\n" not in self._buf:
                self._fill()
            line, _, rest = bytes(self._buf).partition(b"\r\n")
            size = int(line.split(b";")[0], 16)
            self._buf = bytearray(rest)
            while len(self._buf) < size + 2:
                self._fill()
            if size == 0:
                return
            yield bytes(self._buf[:size])
            del self._buf[:size + 2]

    def read(self) -> bytes:
        return b"".join(self.chunks())

    def lines(self) -> Iterator[bytes]:
        pending = b""
        for chunk in self.chunks():
            pending += chunk
            *done, pending = pending.split(b"\n")
            yield from done
        if pending:
            yield pending


class ApiError(ReplicadError):
    """The daemon refused or failed the operation."""


def api_error(status: int, raw: bytes) -> ApiError:
    """The error a daemon answered, as the CLI reports it (a usage error keeps exit code 2)."""
    try:
        doc = json.loads(raw)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        doc = {"error": raw.decode(errors="replace")[:300] or f"HTTP {status}"}
    err = ApiError(str(doc.get("error") or f"HTTP {status}"), hint=doc.get("hint"))
    if doc.get("exit_code") == 2:  # a usage error the daemon caught (bad value for a flag)
        err.exit_code = 2
    return err


class Api(Protocol):
    """What a command talks to: this host's daemon (ApiClient) or another's (-C: remote.RemoteClient)."""

    def call(self, method: str, path: str, body: dict | None = None, *, timeout: float | None = ...) -> Any: ...

    def stream(self, method: str, path: str, body: dict | None = None) -> Iterator[dict]: ...


class ApiClient:
    def __init__(self, socket_path: str):
        self.socket_path = socket_path

    def _send(self, method: str, path: str, body: dict | None, timeout: float | None):
        payload = json.dumps(body).encode() if body is not None else b""
        head = [f"{method} {path} HTTP/1.1", "Host: localhost", f"Content-Length: {len(payload)}",
                "Connection: close"] + (["Content-Type: application/json"] if body is not None else [])
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(self.socket_path)
            sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
            return sock, _Answer(sock)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            sock.close()
            raise DaemonUnreachable(f"cannot reach the replicad daemon at {self.socket_path}: {e.strerror}",
                                    hint="is `replicad daemon` running? use --config or --socket, "
                                         "or -C HOST for a remote host") from None
        except PermissionError:
            sock.close()
            raise DaemonUnreachable(f"permission denied on {self.socket_path}",
                                    hint="run as root or as a member of the socket's group") from None
        except (OSError, ValueError, IndexError) as e:
            sock.close()
            raise DaemonUnreachable(f"the daemon at {self.socket_path} did not answer: {e}") from None

    def call(self, method: str, path: str, body: dict | None = None, *, timeout: float | None = TIMEOUT):
        """One call; ``timeout`` None for an operation that copies disks (failover, reverse)."""
        sock, resp = self._send(method, path, body, timeout)
        try:
            raw = resp.read()
        except (OSError, ValueError) as e:
            raise DaemonUnreachable(f"the daemon at {self.socket_path} did not answer: {e}") from None
        finally:
            sock.close()
        if resp.status >= 400:
            raise api_error(resp.status, raw)
        return json.loads(raw) if raw else None

    def stream(self, method: str, path: str, body: dict | None = None) -> Iterator[dict]:
        """NDJSON lines of a long operation (no timeout: the operation reports progress)."""
        sock, resp = self._send(method, path, body, None)
        try:
            if resp.status >= 400:
                raise api_error(resp.status, resp.read())
            if not resp.headers.get("content-type", "").startswith("application/x-ndjson"):
                yield {"result": json.loads(resp.read() or b"null")}
                return
            try:
                for line in resp.lines():
                    if line.strip():
                        yield json.loads(line)
            except (OSError, ValueError) as e:
                raise DaemonUnreachable(f"lost the daemon at {self.socket_path}: {e}") from None
        finally:
            sock.close()

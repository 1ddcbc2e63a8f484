"""The CLI's client of the management API over the daemon's unix socket (stdlib only:
a CLI call is one short request, and NDJSON progress is read line by line)."""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator

from ..errors import DaemonUnreachable, ReplicadError

TIMEOUT = 30


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self._path)
        self.sock = s


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


class ApiClient:
    def __init__(self, socket_path: str):
        self.socket_path = socket_path

    def _send(self, method: str, path: str, body: dict | None, timeout: float | None):
        conn = _UnixConnection(self.socket_path, timeout)
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        try:
            conn.request(method, path, body=payload, headers=headers)
            return conn, conn.getresponse()
        except (FileNotFoundError, ConnectionRefusedError) as e:
            conn.close()
            raise DaemonUnreachable(f"cannot reach the replicad daemon at {self.socket_path}: {e.strerror}",
                                    hint="is `replicad daemon` running? use --config or --socket") from None
        except PermissionError:
            conn.close()
            raise DaemonUnreachable(f"permission denied on {self.socket_path}",
                                    hint="run as root or as a member of the socket's group") from None
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise DaemonUnreachable(f"the daemon at {self.socket_path} did not answer: {e}") from None

    def call(self, method: str, path: str, body: dict | None = None):
        conn, resp = self._send(method, path, body, TIMEOUT)
        try:
            raw = resp.read()
        finally:
            conn.close()
        if resp.status >= 400:
            raise api_error(resp.status, raw)
        return json.loads(raw) if raw else None

    def stream(self, method: str, path: str, body: dict | None = None) -> Iterator[dict]:
        """NDJSON lines of a long operation (no timeout: the operation reports progress)."""
        conn, resp = self._send(method, path, body, None)
        try:
            if resp.status >= 400:
                raise api_error(resp.status, resp.read())
            if not resp.getheader("Content-Type", "").startswith("application/x-ndjson"):
                yield {"result": json.loads(resp.read() or b"null")}
                return
            for line in resp:
                if line.strip():
                    yield json.loads(line)
        finally:
            conn.close()

"""Which listener a port is, asked only after a connection in one mode failed.

A relationship's mode and port go together: certificates to the token listener end in
`[SSL: WRONG_VERSION_NUMBER]`, a token to the TLS listener in a dropped connection. Neither
tells an operator what is wrong, so after such a failure the primary looks at the port
once: does it answer plain HTTP, or a TLS handshake? The answer becomes the error
("port 80 … answers plain HTTP: it is the token listener; …"). Blocking sockets with a
short timeout: call it in a worker thread."""

from __future__ import annotations

import socket
import ssl

from ..errors import ErrorCode, PeerError

PROBE_TIMEOUT = 3.0
DEFAULT_PORTS = {"token": 80, "kerberos": 80, "certificate": 443}


def listener_kind(address: str, port: int, timeout: float = PROBE_TIMEOUT) -> str | None:
    """``"tls"`` if the port answers a TLS handshake, ``"http"`` if it answers plain HTTP,
    None when it cannot be told (nothing listens, it hangs, something else answers)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # only "is it TLS?": identities are checked by the real connection
    try:
        with socket.create_connection((address, port), timeout) as raw, \
                ctx.wrap_socket(raw, do_handshake_on_connect=False) as tls:
            try:
                tls.do_handshake()
                return "tls"
            except ssl.SSLError as e:
                if e.reason == "WRONG_VERSION_NUMBER":
                    return "http" if _speaks_http(address, port, timeout) else None
                return "tls"  # an alert (e.g. a client certificate is required) is TLS speaking
    except OSError:
        return None


def _speaks_http(address: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((address, port), timeout) as s:
            s.sendall(b"GET /v1/hello HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n")
            return s.recv(5) == b"HTTP/"
    except OSError:
        return False


def mismatch(server: str, port: int, auth: str, address: str) -> PeerError | None:
    """The error to report when ``port`` is the other mode's listener, else None."""
    kind = listener_kind(address, port)
    if auth == "certificate" and kind == "http":
        msg = (f"port {port} of {server} answers plain HTTP: it is the token listener; use the TLS listener's "
               f"port ({DEFAULT_PORTS['certificate']} by default) for certificate authentication")
    elif auth in ("token", "kerberos") and kind == "tls":
        msg = (f"port {port} of {server} answers TLS: it is the certificate listener; use the token listener's "
               f"port ({DEFAULT_PORTS['token']} by default) for {auth} authentication")
    else:
        return None
    # the operator has to change the relationship: retrying the same port cannot help
    return PeerError(msg, status=0, transient=False, code=ErrorCode.WRONG_LISTENER)

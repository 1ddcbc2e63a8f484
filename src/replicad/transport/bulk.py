"""One change log sent over a blocking socket, from the worker thread that produces it.

A log is nearly every byte replicad sends. Through aiohttp and asyncio's TLS layer each
batch hopped from the producer's thread to the event loop, was copied into a memory BIO,
encrypted, copied out, and copied again into the transport's buffer; on this 2-core
machine that path, not the disks, set the speed (bench: docs/performance.md). Here the
producer's thread writes each batch straight into the socket — for TLS, SSL_write onto the
socket, with the GIL released while OpenSSL encrypts and the kernel copies — as one chunked
HTTP/1.1 PUT, then reads the replica's JSON answer. The request is the same one the
aiohttp client sends (the replica cannot tell them apart); its headers (token session
MAC) are built by the conversation, and the answer is checked there too.

Cancellation: the caller sets ``cancel`` and shuts the socket down; the thread stops at its
next send. Pacing for ``--bandwidth-limit`` sleeps in this thread, never on the loop."""

from __future__ import annotations

import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from multidict import CIMultiDict

from ..auth import tls as tlsmod
from ..errors import AuthenticationFailed, PeerError, PeerUnreachable, ProducerFailed, no_such_host

MAX_ANSWER = 1 << 20
_IOV_MAX = 1024  # buffers per sendmsg (Linux's UIO_MAXIOV)
SNDBUF = 4 << 20
# A link that dies silently (a cable, a firewall dropping packets) sends no reset: without
# these, a blocked send waits io_timeout (minutes) and a wait for the answer as long. Data
# left unacknowledged this long ends the connection (TCP_USER_TIMEOUT), and an idle wait
# for the answer is probed (keepalive): either way the cycle fails in well under a minute,
# is retried with backoff, and an initial copy resumes from the replica's durable offset.
LINK_TIMEOUT_MS = 30_000
KEEPALIVE = (10, 5, 3)  # idle seconds before probing, seconds between probes, probes


def watch_link(sock: socket.socket) -> socket.socket:
    """Give a peer connection the link-loss bounds above (also used for aiohttp's sockets)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, LINK_TIMEOUT_MS)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt, value in zip((socket.TCP_KEEPIDLE, socket.TCP_KEEPINTVL, socket.TCP_KEEPCNT), KEEPALIVE, strict=True):
        sock.setsockopt(socket.IPPROTO_TCP, opt, value)
    return sock


@dataclass
class Target:
    server: str
    port: int
    address: str                       # resolved by the caller (the config's resolve map first)
    tls: ssl.SSLContext | None = None  # certificate mode: the client context (CA, our certificate)
    pins: dict = field(default_factory=dict)
    connect_timeout: float = 10.0
    io_timeout: float = 300.0


class Channel:
    """The socket of one push; ``abort()`` may be called from another thread."""

    def __init__(self) -> None:
        self.cancel = threading.Event()
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    def attach(self, sock: socket.socket) -> None:
        with self._lock:
            self._sock = sock
            if self.cancel.is_set():
                sock.shutdown(socket.SHUT_RDWR)

    def abort(self) -> None:
        with self._lock:
            self.cancel.set()
            if self._sock is not None:
                try:
                    self._sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def _connect(t: Target, channel: Channel) -> socket.socket:
    try:
        raw = socket.create_connection((t.address, t.port), timeout=t.connect_timeout)
    except socket.gaierror as e:
        raise no_such_host(t.server, e.strerror or str(e)) from None
    except OSError as e:
        raise PeerUnreachable(f"cannot reach {t.server}:{t.port}: {e.strerror or e}") from None
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
    watch_link(raw)
    raw.settimeout(t.io_timeout)
    sock = raw
    if t.tls is not None:
        try:
            sock = t.tls.wrap_socket(raw, server_hostname=t.server)
        except ssl.SSLCertVerificationError as e:
            raw.close()
            raise PeerError(f"TLS: the certificate of {t.server} was refused: {e.verify_message}", status=0,
                            transient=False) from None
        except (ssl.SSLError, OSError) as e:
            raw.close()
            raise PeerUnreachable(f"TLS handshake with {t.server}:{t.port} failed: {e}") from None
        if t.pins:
            try:
                tlsmod.check_pin(t.pins, t.server, tlsmod.thumbprint(sock.getpeercert(binary_form=True) or b""))
            except AuthenticationFailed as e:
                sock.close()
                raise PeerError(f"TLS: {e}", status=0, transient=False) from None
    channel.attach(sock)
    return sock


def _early_answer(sock: socket.socket, io_timeout: float) -> bytes | None:
    """Bytes of an answer the replica sent before the log ended (it refused it), or None.
    Readable is not enough on TLS: 1.3 session tickets arrive after the handshake and carry
    no application data, so a non-blocking read decides."""
    if not select.select([sock], [], [], 0)[0]:
        return None
    sock.setblocking(False)
    try:
        return sock.recv(65536)
    except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError, InterruptedError):
        return None
    finally:
        sock.settimeout(io_timeout)


def _read_answer(sock: socket.socket, server: str, first: bytes = b"") -> tuple[int, bytes, CIMultiDict[str]]:
    buf = bytearray(first)
    while b"\r\n\r\n" not in buf:
        got = sock.recv(65536)
        if not got:
            raise PeerUnreachable(f"{server} closed the connection before answering")
        buf += got
        if len(buf) > MAX_ANSWER:
            raise PeerError(f"{server} sent an oversized answer", status=0, transient=True)
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split(" ", 2)[1])
    except (IndexError, ValueError):
        raise PeerError(f"{server} answered something that is not HTTP", status=0, transient=True) from None
    headers: CIMultiDict[str] = CIMultiDict()  # header names are case-insensitive
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip()] = v.strip()
    body = bytearray(rest)
    if headers.get("Transfer-Encoding", "").lower() == "chunked":
        body = _dechunk(sock, body, server)
    else:
        try:
            length = int(headers.get("Content-Length", "0") or 0)
        except ValueError:
            raise PeerError(f"{server} answered with a malformed Content-Length", status=0, transient=True) from None
        if length > MAX_ANSWER:
            raise PeerError(f"{server} sent an oversized answer", status=0, transient=True)
        while len(body) < length:
            got = sock.recv(length - len(body))
            if not got:
                raise PeerUnreachable(f"{server} closed the connection in the middle of its answer")
            body += got
    return status, bytes(body), headers


def _dechunk(sock: socket.socket, buf: bytearray, server: str) -> bytearray:
    out = bytearray()
    while True:
        while b"\r\n" not in buf:
            got = sock.recv(65536)
            if not got:
                raise PeerUnreachable(f"{server} closed the connection in the middle of its answer")
            buf += got
            if len(buf) > MAX_ANSWER:
                raise PeerError(f"{server} sent an oversized answer", status=0, transient=True)
        size_line, _, rest = bytes(buf).partition(b"\r\n")
        try:
            size = int(size_line.split(b";")[0][:16], 16)
        except ValueError:
            raise PeerError(f"{server} sent a malformed chunked answer", status=0, transient=True) from None
        if len(out) + size > MAX_ANSWER:  # before reading it: the peer does not decide what we hold
            raise PeerError(f"{server} sent an oversized answer", status=0, transient=True)
        buf = bytearray(rest)
        while len(buf) < size + 2:
            got = sock.recv(65536)
            if not got:
                raise PeerUnreachable(f"{server} closed the connection in the middle of its answer")
            buf += got
        if size == 0:
            return out
        out += buf[:size]
        buf = buf[size + 2:]
        if len(out) > MAX_ANSWER:
            raise PeerError(f"{server} sent an oversized answer", status=0, transient=True)


def _send_all(sock: socket.socket, buffers: list) -> None:
    """Send the buffers in order: gathered by one ``sendmsg`` per round on a plain socket
    (the payloads are views of the producer's read buffer: never copied in user space),
    joined first on TLS (an SSL socket writes one buffer at a time)."""
    if isinstance(sock, ssl.SSLSocket):
        sock.sendall(b"".join(buffers))
        return
    views = [memoryview(b) for b in buffers if len(b)]
    i = 0
    while i < len(views):
        n = sock.sendmsg(views[i:i + _IOV_MAX])
        while i < len(views) and n >= len(views[i]):
            n -= len(views[i])
            i += 1
        if n:
            views[i] = views[i][n:]


def push(t: Target, path: str, headers: dict[str, str], batches: Iterator[list], channel: Channel, *,
         on_sent: Callable[[int], None] = lambda n: None, bandwidth_limit: int = 0,
         upgrade: str | None = None) -> tuple[int, bytes, CIMultiDict[str]]:
    """PUT ``path`` with the batches as a chunked body; returns (status, body, headers).
    With ``upgrade`` (the replica's token listener offers it: transport/raw.py) the PUT has
    no body: once the replica answers 101 the batches follow as they are, unframed.
    Raises ProducerFailed when ``batches`` raised, PeerUnreachable when the network failed."""
    sock = _connect(t, channel)
    try:
        head = [f"PUT {path} HTTP/1.1", f"Host: {t.server}:{t.port}", "Content-Type: application/octet-stream"]
        head += ["Connection: Upgrade", f"Upgrade: {upgrade}"] if upgrade else \
            ["Transfer-Encoding: chunked", "Connection: close"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        sent, started = 0, time.monotonic()
        try:
            sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
            if upgrade:
                status, body, rh = _read_answer(sock, t.server)
                if status != 101:
                    return status, body, rh  # refused before the log (authentication, protocol)
            while True:  # ends with the last batch (then the terminating chunk) or an early answer
                if channel.cancel.is_set():
                    raise PeerUnreachable("the transfer was cancelled")
                try:
                    batch = next(batches)
                except StopIteration:
                    if not upgrade:
                        sock.sendall(b"0\r\n\r\n")  # the terminating chunk
                    break
                except Exception as e:  # noqa: BLE001 — the producer's own failure
                    raise ProducerFailed(e) from e
                early = _early_answer(sock, t.io_timeout)
                if early is not None:
                    return _read_answer(sock, t.server, early)  # it refused the log: read why
                n = sum(len(b) for b in batch)
                if not upgrade:
                    batch = [b"%x\r\n" % n, *batch, b"\r\n"]
                _send_all(sock, batch)
                sent += n
                on_sent(n)
                if bandwidth_limit:  # pace to the configured rate
                    ahead = sent / bandwidth_limit - (time.monotonic() - started)
                    if ahead > 0:
                        channel.cancel.wait(ahead)
        except (ProducerFailed, PeerUnreachable):
            raise
        except OSError as e:
            # the replica may have answered early (refused the log) and closed: read that answer
            if channel.cancel.is_set():
                raise PeerUnreachable("the transfer was cancelled") from None
            try:
                sock.settimeout(2)
                return _read_answer(sock, t.server)
            except (OSError, PeerError):
                raise PeerUnreachable(f"connection to {t.server}:{t.port} failed while sending: "
                                      f"{e.strerror or e}") from None
        try:
            return _read_answer(sock, t.server)
        except OSError as e:
            raise PeerUnreachable(f"connection to {t.server}:{t.port} failed while waiting for the answer: "
                                  f"{e.strerror or e}") from None
    finally:
        try:
            sock.close()
        except OSError:
            pass

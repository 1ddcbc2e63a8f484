"""How a peer listener takes connections: limits that hold before anyone is authenticated.

A connection costs a descriptor before it says a word. With aiohttp's own site a host
that opened a few hundred TCP connections and stayed silent held one each for the idle
timeout (60 s) — in TLS's case for asyncio's 60 s handshake timeout — until the daemon
had no descriptor left to accept its own primaries or open its files. So a peer listener
accepts its connections itself (``CappedSite``) and judges each by its address before TLS
or HTTP begin:

- at most ``max_connections`` open on the listener, and at most
  ``max_connections_per_address`` from one address; one more is closed at once and the
  refusals are logged (``listener.full``, at most once per 10 s, with their count);
- the limits are cut down to leave half of the process's descriptors for files
  (``fit_limits``), and the daemon raises its soft descriptor limit to the hard one;
- the TLS handshake, and then the head of the first request, must be complete within the
  listener's ``header_timeout``; after that the idle timeout applies as before.
Accept failures (out of descriptors or memory anyway) pause accepting for a second instead
of spinning."""

from __future__ import annotations

import asyncio
import resource
import socket
import ssl
import time
from typing import Any

from aiohttp import web

from .. import log as logmod

log = logmod.get("replicad.peer")
LOG_EVERY = 10.0  # seconds between two `listener.full` lines of one listener
ACCEPT_PAUSE = 1.0


def raise_descriptor_limit(target: int = 65536) -> tuple[int, int]:
    """Raise the soft limit on open files towards the hard one (systemd's default soft
    limit is 1024); returns (soft, hard) as they are now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, target) if hard != resource.RLIM_INFINITY else target
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        soft = want
    return soft, hard


def fit_limits(max_connections: int, per_address: int, listeners: int) -> tuple[int, int]:
    """The configured limits, cut so that the peer listeners together hold at most half of
    the descriptors this process may open; one address gets at most a quarter of a
    listener (so a single host never fills it)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    total = min(max_connections, max(32, soft // 2 // max(1, listeners)))
    return total, min(per_address, max(1, total // 4))


class ConnectionLimits:
    """The open connections of one listener, by address, and the ones still owing the head
    of their first request."""

    def __init__(self, what: str, total: int, per_address: int, header_timeout: float):
        self.what, self.total, self.per_address, self.header_timeout = what, total, per_address, header_timeout
        self._open: dict[str, list[socket.socket]] = {}
        self._awaiting: dict[asyncio.BaseTransport, asyncio.TimerHandle] = {}
        self._refused = 0
        self._logged = 0.0

    def admit(self, conn: socket.socket, address: str) -> bool:
        """Whether a just-accepted connection from ``address`` may stay (the caller closes
        it otherwise). A connection counts until its socket is closed, whoever closes it."""
        for addr in list(self._open):
            alive = [s for s in self._open[addr] if s.fileno() != -1]
            if alive:
                self._open[addr] = alive
            else:
                del self._open[addr]
        mine = self._open.get(address, [])
        held = sum(len(v) for v in self._open.values())
        if held >= self.total or len(mine) >= self.per_address:
            self._refused += 1
            now = time.monotonic()
            if now - self._logged >= LOG_EVERY:
                log.warning("listener.full", listener=self.what, address=address, refused=self._refused,
                            open=held, from_address=len(mine),
                            reason=(f"{address} already holds {len(mine)} connections (max_connections_per_address)"
                                    if len(mine) >= self.per_address else
                                    f"the listener holds {held} connections (max_connections)"))
                self._logged, self._refused = now, 0
            return False
        self._open.setdefault(address, []).append(conn)
        return True

    def await_head(self, transport: asyncio.Transport) -> None:
        """Close the connection unless the head of its first request is in within the
        header deadline (``greeted`` says it is)."""
        loop = asyncio.get_running_loop()
        self._awaiting[transport] = loop.call_later(self.header_timeout, self._too_slow, transport)

    def greeted(self, transport: asyncio.BaseTransport | None) -> None:
        handle = self._awaiting.pop(transport, None) if transport is not None else None
        if handle is not None:
            handle.cancel()

    def _too_slow(self, transport: asyncio.Transport) -> None:
        self._awaiting.pop(transport, None)
        if not transport.is_closing():
            peer = transport.get_extra_info("peername")
            log.info("listener.head_timeout", listener=self.what, peer_ip=peer[0] if peer else None,
                     reason=f"no complete request within {self.header_timeout:g}s (header_timeout)")
            transport.abort()

    def forget(self) -> None:
        for handle in self._awaiting.values():
            handle.cancel()
        self._awaiting.clear()


class CappedSite(web.BaseSite):
    """A TCP site that accepts its connections itself and applies ``ConnectionLimits``
    (and, with ``ssl_context``, the handshake deadline) before handing them to aiohttp."""

    __slots__ = ("_host", "_port", "_limits", "_sock", "_tasks", "_loop")

    def __init__(self, runner: web.BaseRunner, host: str, port: int, limits: ConnectionLimits, *,
                 ssl_context: ssl.SSLContext | None = None, backlog: int = 128):
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self._host, self._port, self._limits = host, port, limits
        self._sock: socket.socket | None = None
        self._tasks: set[asyncio.Task] = set()

    @property
    def name(self) -> str:
        return f"{'https' if self._ssl_context else 'http'}://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        self._loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        self._sock = sock = socket.create_server((self._host, self._port), family=family, backlog=self._backlog)
        sock.setblocking(False)
        self._loop.add_reader(sock.fileno(), self._accept)
        # BaseSite types this as an asyncio server, but its stop() only calls close()
        self._server = _Stopper(self)  # type: ignore[assignment]

    def _accept(self) -> None:
        sock = self._sock
        if sock is None:  # closed
            return
        for _ in range(self._backlog):
            try:
                conn, addr = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # out of descriptors or memory: wait rather than spin
                log.error("listener.accept_failed", listener=self._limits.what, reason=e.strerror,
                          retry_in=ACCEPT_PAUSE)
                self._loop.remove_reader(sock.fileno())
                self._loop.call_later(ACCEPT_PAUSE, self._resume)
                return
            if not self._limits.admit(conn, addr[0]):
                conn.close()
                continue
            conn.setblocking(False)
            task = self._loop.create_task(self._serve(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _resume(self) -> None:
        if self._sock is not None and self._sock.fileno() != -1:
            self._loop.add_reader(self._sock.fileno(), self._accept)

    async def _serve(self, conn: socket.socket) -> None:
        kw: dict[str, Any] = {"ssl": self._ssl_context, "ssl_handshake_timeout": self._limits.header_timeout} \
            if self._ssl_context is not None else {}
        server = self._runner.server
        assert server is not None  # a runner is set up before its sites start
        try:
            transport, _ = await self._loop.connect_accepted_socket(server, conn, **kw)
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as e:
            conn.close()
            log.debug("listener.handshake_failed", listener=self._limits.what, reason=str(e) or type(e).__name__)
            return
        self._limits.await_head(transport)

    def close(self) -> None:
        if self._sock is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
        for t in self._tasks:
            t.cancel()
        self._limits.forget()


class _Stopper:
    """What ``BaseSite.stop`` closes: the listening socket and pending handshakes."""

    def __init__(self, site: CappedSite):
        self._site = site

    def close(self) -> None:
        self._site.close()

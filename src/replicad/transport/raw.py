"""A change log received on a raw connection: the token listener's upgraded PUT.

On port 80 a primary that sees the ``raw-log`` capability in the replica's hello sends
``PUT /v1/replicas/<vm>/logs/<seq>`` with ``Connection: Upgrade`` and
``Upgrade: replicad-log`` and no body. The request is authenticated like any other (its
session MAC, in the middleware); the handler stops aiohttp reading the socket, answers
``101 Switching Protocols``, and the log's bytes follow, unframed, until its trailer. The
replica then writes an ordinary HTTP answer (JSON, with the session's response MAC) and
closes. Nothing else changes: the bytes are the same log, every item with its MAC.

Why: through aiohttp each byte of a log was copied four times on its way to the disk
(socket → bytes, HTTP chunk parser, stream buffer joins, decoder joins) with the event loop
and the writer fighting for the GIL; that, not the network or the disk, set the speed of
an initial copy (docs/performance.md). Here a worker thread reads each record from the
socket straight into the O_DIRECT write buffer (wire/codec.py ``LogDecoder.pull``).

The socket is a duplicate of the transport's descriptor, used in timeout mode (the
descriptor stays non-blocking, as asyncio expects); ``abort()`` shuts it down, which ends
any read in progress at once."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from .. import workers
from ..errors import TransferStalled, WireError
from ..wire import Header, LogDecoder
from ..wire.header import PREAMBLE_SIZE, header_size
from ..wire.mac import MAC_LEN

if TYPE_CHECKING:
    from .endpoints import LogWriter

UPGRADE = "replicad-log"
CAPABILITY = "raw-log"
LINGER_S = 2.0  # after the answer: how long unread bytes are drained so a refusal is not lost
LINGER_BYTES = 64 << 20

T = TypeVar("T")


class RawLog:
    """An ``IncomingLog`` (transport/endpoints.py): the header is read on the event loop,
    the rest by the writer itself in a worker thread (``LogWriter.pull``)."""

    connection = "raw"

    def __init__(self, sock: socket.socket, idle_timeout: float):
        self.sock = sock
        self.idle_timeout = idle_timeout
        sock.settimeout(idle_timeout)
        self.received = 0

    @classmethod
    def from_transport(cls, transport: asyncio.Transport, idle_timeout: float) -> RawLog:
        """Take over the socket of an aiohttp connection whose reading was paused."""
        sock = transport.get_extra_info("socket")
        if sock is None:
            raise TransferStalled("the connection closed before the log started")
        return cls(socket.socket(fileno=os.dup(sock.fileno())), idle_timeout)

    # reading (worker threads) ------------------------------------------------------------
    def read_into(self, view: memoryview) -> None:
        """Fill ``view`` from the socket, or raise."""
        while view:
            try:
                n = self.sock.recv_into(view)
            except TimeoutError:
                raise TransferStalled(f"no data for {self.idle_timeout:.0f}s: the transfer stalled") from None
            if not n:
                raise ConnectionResetError("the primary closed the connection in the middle of the log")
            self.received += n
            view = view[n:]

    def recv(self, limit: int) -> bytes:
        """What the socket has, up to ``limit`` bytes; b"" at the end of the stream."""
        try:
            got = self.sock.recv(limit)
        except TimeoutError:
            raise TransferStalled(f"no data for {self.idle_timeout:.0f}s: the transfer stalled") from None
        self.received += len(got)
        return got

    async def read_header(self, dec: LogDecoder) -> tuple[Header, bytes, list]:
        """Read exactly the log's header (and its MAC): the decoder holds nothing more, so
        ``LogDecoder.pull`` can go on from here. Read on the event loop, not in a thread: a
        peer that trickles its header holds no thread (the caller bounds it with the
        listener's header deadline; each read with the idle timeout)."""
        loop = asyncio.get_running_loop()
        self.sock.setblocking(False)
        try:
            pre = await self._recv_exactly(loop, PREAMBLE_SIZE)
            dec.feed(pre)  # checks the magic, the version and the header's length bound
            got = await self._recv_exactly(loop, header_size(pre))
            raw = pre + got
            items = dec.feed(got)
            if not items:  # the header's MAC follows it
                tag = await self._recv_exactly(loop, MAC_LEN)
                raw += tag
                items = dec.feed(tag)
        finally:
            self.sock.settimeout(self.idle_timeout)  # the rest is read by a worker thread
        if not items or not isinstance(items[0], Header):
            raise WireError("change log truncated before its header")
        return items[0], raw, items[1:]

    async def deliver(self, writer: LogWriter) -> None:
        """The rest of the log, read and written by one worker thread straight from the socket."""
        await self.run(writer.pull, self)

    async def _recv_exactly(self, loop: asyncio.AbstractEventLoop, n: int) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        while view:
            try:
                async with asyncio.timeout(self.idle_timeout):
                    got = await loop.sock_recv_into(self.sock, view)
            except TimeoutError:
                raise TransferStalled(f"no data for {self.idle_timeout:.0f}s: the transfer stalled") from None
            if not got:
                raise ConnectionResetError("the primary closed the connection in the middle of the log")
            self.received += got
            view = view[got:]
        return bytes(buf)

    # the answer -----------------------------------------------------------------------------
    def answer(self, status: int, reason: str, body: bytes, headers: dict[str, str]) -> None:
        """Write the HTTP answer, then drain what the primary may still be sending (briefly)
        so closing does not reset the connection before it reads the answer."""
        head = [f"HTTP/1.1 {status} {reason}", "Content-Type: application/json; charset=utf-8",
                f"Content-Length: {len(body)}", "Connection: close", *(f"{k}: {v}" for k, v in headers.items())]
        try:
            self.sock.settimeout(LINGER_S)
            self.sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
            self.sock.shutdown(socket.SHUT_WR)
            drained = 0
            while drained < LINGER_BYTES:
                got = self.sock.recv(1 << 20)
                if not got:
                    break
                drained += len(got)
        except OSError:
            pass  # the primary went away: it retries, and this log was already handled

    async def run(self, fn: Callable[..., T], *args) -> T:
        """``fn`` in a worker thread; if the caller is cancelled (the daemon stops), the
        socket is shut down so the thread ends now, and it is waited for."""
        fut = asyncio.ensure_future(workers.RECEIVE.run(fn, *args))
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            self.abort()
            await asyncio.gather(fut, return_exceptions=True)
            raise

    def cut(self) -> None:
        """End the receipt at once: the reading thread fails."""
        self.abort()

    def abort(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()

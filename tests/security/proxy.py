"""A fault-injecting TCP proxy for tests: forwards a port, and can flip one byte of the
first PUT request body (client → server; on an upgraded log, the bytes after the request's
head) or of its answer body (server → client; a 101 is not the answer), or, for
TLS where HTTP cannot be seen, the byte at an absolute offset of a client → server stream."""

from __future__ import annotations

import asyncio
import threading

from tests.threaded_proxy import ThreadedProxy


class FlipProxy(ThreadedProxy):
    def __init__(self, listen: tuple[str, int], target: tuple[str, int]):
        super().__init__(listen, target)
        self.flip_request_at: int | None = None   # body offset of a PUT request to corrupt, once
        self.flip_answer_at: int | None = None    # body offset of a PUT's answer to corrupt, once
        self.flip_stream_at: int | None = None    # offset in a client → server stream, once
        self.flipped = 0

    async def relay(self, cr, cw) -> None:
        try:
            sr, sw = await asyncio.open_connection(*self.target)
        except OSError:
            cw.close()
            return
        self.track(sw)
        state = {"puts": 0, "answers": 0}
        await asyncio.gather(self._pipe(cr, sw, "request", state), self._pipe(sr, cw, "answer", state),
                             return_exceptions=True)

    async def _pipe(self, r, w, direction: str, state: dict) -> None:
        """Forward bytes, finding each PUT request (or the answer to each PUT) by its headers,
        on a keep-alive connection too; offsets are absolute positions in the stream."""
        buf, base, search = bytearray(), 0, 0
        body_start = None
        try:
            while data := await r.read(65536):
                data = bytearray(data)
                pos0 = base + len(buf)
                buf += data
                if direction == "answer" and state["puts"] <= state["answers"]:
                    search = base + len(buf)  # answers to earlier requests: not of interest
                while direction == "request" or state["puts"] > state["answers"]:
                    marker = b"PUT /v1/replicas/" if direction == "request" else b"HTTP/1.1 "
                    m = buf.find(marker, max(0, search - base))
                    e = buf.find(b"\r\n\r\n", m) if m >= 0 else -1
                    if e < 0:
                        break
                    search = base + e + 4
                    if buf[m:m + 12] == b"HTTP/1.1 101":  # the upgraded log's go-ahead, not its answer
                        continue
                    body_start = search
                    state["puts" if direction == "request" else "answers"] += 1
                raw = self.flip_stream_at if direction == "request" else None
                if raw is not None and pos0 <= raw < pos0 + len(data):
                    data[raw - pos0] ^= 0x01
                    self.flipped += 1
                    self.flip_stream_at = None
                at = self.flip_request_at if direction == "request" else self.flip_answer_at
                if body_start is not None and at is not None and pos0 <= body_start + at < pos0 + len(data):
                    data[body_start + at - pos0] ^= 0x01
                    self.flipped += 1
                    if direction == "request":
                        self.flip_request_at = None
                    else:
                        self.flip_answer_at = None
                if len(buf) > 1 << 20:
                    drop = len(buf) - 65536
                    del buf[:drop]
                    base += drop
                w.write(bytes(data))
                await w.drain()
        finally:
            w.close()


class FloodProxy(ThreadedProxy):
    """A man in the middle that relays every request until one whose first line contains
    ``marker`` (once armed), then answers that one itself: ``head`` (a 200 announcing
    ``Content-Length: announce``) and ``prefix``, then garbage as fast as the client takes
    it, up to ``limit`` bytes. ``flooded`` is how many bytes the client accepted before it
    hung up."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int]):
        super().__init__(listen, target)
        self.marker: bytes | None = None
        self.prefix = b""
        self.announce = 1 << 40
        self.limit = 800 << 20
        self.flooded = 0
        self.hung_up = threading.Event()

    async def relay(self, cr, cw) -> None:
        try:
            sr, sw = await asyncio.open_connection(*self.target)
        except OSError:
            cw.close()
            return
        self.track(sw)
        answers = asyncio.ensure_future(self._pipe(sr, cw))
        try:
            while data := await cr.read(65536):
                if self.marker is not None and self.marker in data.split(b"\r\n", 1)[0]:
                    self.marker = None
                    answers.cancel()
                    await self._flood(cw)
                    return
                sw.write(data)
                await sw.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            answers.cancel()
            sw.close()
            cw.close()

    @staticmethod
    async def _pipe(r, w) -> None:
        try:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        except ConnectionError:
            pass

    async def _flood(self, cw) -> None:
        cw.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                 b"Content-Length: %d\r\n\r\n" % self.announce + self.prefix)
        junk = bytes(range(256)) * 4096  # 1 MiB
        try:
            while self.flooded < self.limit:
                cw.write(junk)
                await cw.drain()
                self.flooded += len(junk)
        except (ConnectionError, OSError):
            self.hung_up.set()

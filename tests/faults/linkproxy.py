"""A TCP proxy that breaks links on purpose: it forwards a port, counts the bytes each way,
can cut every connection once a number of bytes went through, refuse connections (a link
that is down), add latency to every chunk it forwards, and stall once for a while (a link
that hangs without breaking)."""

from __future__ import annotations

import asyncio

from tests.threaded_proxy import ThreadedProxy


class LinkProxy(ThreadedProxy):
    def __init__(self, listen: tuple[str, int], target: tuple[str, int]):
        super().__init__(listen, target)
        self.up_bytes = 0          # client -> server, every connection, all the time
        self.cut_after: int | None = None  # cut the connection carrying byte N (once)
        self.cuts = 0
        self.down = False          # refuse new connections
        self.latency = 0.0         # seconds added to every chunk forwarded, both ways
        self.stall_after: int | None = None  # once this many bytes went up, hang...
        self.stall_seconds = 0.0   # ...this long before forwarding more
        self.stalls = 0

    async def relay(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        if self.down:
            cw.transport.abort()
            return
        try:
            sr, sw = await asyncio.open_connection(*self.target)
        except OSError:
            cw.transport.abort()
            return
        self.track(sw)
        cut = asyncio.Event()

        async def pump(r: asyncio.StreamReader, w: asyncio.StreamWriter, upstream: bool) -> None:
            try:
                while data := await r.read(1 << 16):
                    if upstream:
                        self.up_bytes += len(data)
                        if self.cut_after is not None and self.up_bytes >= self.cut_after:
                            self.cut_after = None
                            self.cuts += 1
                            return
                        if self.stall_after is not None and self.up_bytes >= self.stall_after:
                            self.stall_after = None
                            self.stalls += 1
                            await asyncio.sleep(self.stall_seconds)
                    if self.latency:
                        await asyncio.sleep(self.latency)
                    w.write(data)
                    await w.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                cut.set()
        tasks = [asyncio.ensure_future(pump(cr, sw, True)), asyncio.ensure_future(pump(sr, cw, False))]
        try:
            await cut.wait()
        finally:
            for w in (cw, sw):
                w.transport.abort()  # a reset, as a broken link gives
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.untrack(cw, sw)

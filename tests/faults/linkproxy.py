"""A TCP proxy that breaks links on purpose: it forwards a port, counts the bytes each way,
can cut every connection once a number of bytes went through, and can refuse connections
(a link that is down)."""

from __future__ import annotations

import asyncio
import threading


class LinkProxy:
    def __init__(self, listen: tuple[str, int], target: tuple[str, int]):
        self.listen, self.target = listen, target
        self.up_bytes = 0          # client -> server, every connection, all the time
        self.cut_after: int | None = None  # cut the connection carrying byte N (once)
        self.cuts = 0
        self.down = False          # refuse new connections
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._open: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "LinkProxy":
        self._thread.start()
        assert self._ready.wait(10), "proxy did not start"
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main())
        self._loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._client, *self.listen, reuse_address=True)
        self._ready.set()
        await self._stop.wait()
        server.close()
        for w in list(self._open):  # connections still open (keep-alive): closed with the proxy
            w.transport.abort()
        await asyncio.sleep(0)  # let the pumps see it
        await server.wait_closed()

    async def _client(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        if self.down:
            cw.transport.abort()
            return
        try:
            sr, sw = await asyncio.open_connection(*self.target)
        except OSError:
            cw.transport.abort()
            return
        cut = asyncio.Event()
        self._open.update((cw, sw))

        async def pump(r: asyncio.StreamReader, w: asyncio.StreamWriter, upstream: bool) -> None:
            try:
                while data := await r.read(1 << 16):
                    if upstream:
                        self.up_bytes += len(data)
                        if self.cut_after is not None and self.up_bytes >= self.cut_after:
                            self.cut_after = None
                            self.cuts += 1
                            cut.set()
                            return
                    w.write(data)
                    await w.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                cut.set()
        tasks = [asyncio.ensure_future(pump(cr, sw, True)), asyncio.ensure_future(pump(sr, cw, False))]
        await cut.wait()
        for w in (cw, sw):
            w.transport.abort()  # a reset, as a broken link gives
        await asyncio.gather(*tasks, return_exceptions=True)
        self._open.difference_update((cw, sw))

"""The shared part of the test suite's TCP proxies: an asyncio server on its own event loop
in a thread, that relays each connection to a target (subclasses say how) and, when the
proxy closes, cancels the relays and resets every connection still open."""

from __future__ import annotations

import asyncio
import threading


class ThreadedProxy:
    def __init__(self, listen: tuple[str, int], target: tuple[str, int]):
        self.listen, self.target = listen, target
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._tasks: set[asyncio.Task] = set()
        self._open: set[asyncio.StreamWriter] = set()

    def __enter__(self):
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
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for w in list(self._open):
            w.transport.abort()
        await server.wait_closed()

    def track(self, *writers: asyncio.StreamWriter) -> None:
        self._open.update(writers)

    def untrack(self, *writers: asyncio.StreamWriter) -> None:
        self._open.difference_update(writers)

    async def _client(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        self.track(cw)
        try:
            await self.relay(cr, cw)
        finally:
            self._tasks.discard(task)

    async def relay(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        raise NotImplementedError

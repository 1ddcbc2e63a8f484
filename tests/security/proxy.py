"""A fault-injecting TCP proxy for tests: forwards a port, and can flip one byte of the
first PUT request body (client → server) or of its answer body (server → client)."""

from __future__ import annotations

import asyncio
import threading


class FlipProxy:
    def __init__(self, listen: tuple[str, int], target: tuple[str, int]):
        self.listen, self.target = listen, target
        self.flip_request_at: int | None = None   # body offset of a PUT request to corrupt, once
        self.flip_answer_at: int | None = None    # body offset of a PUT's answer to corrupt, once
        self.flipped = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "FlipProxy":
        self._thread.start()
        assert self._ready.wait(10), "proxy did not start"
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main())

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._client, *self.listen, reuse_address=True)
        self._ready.set()
        await self._stop.wait()
        server.close()

    async def _client(self, cr, cw) -> None:
        try:
            sr, sw = await asyncio.open_connection(*self.target)
        except OSError:
            cw.close()
            return
        state = {"put_sent": False}
        await asyncio.gather(self._pipe(cr, sw, "request", state), self._pipe(sr, cw, "answer", state),
                             return_exceptions=True)

    async def _pipe(self, r, w, direction: str, state: dict) -> None:
        scan = bytearray()   # bytes since we started looking for the headers we care about
        body_pos = None      # body offset of the next byte, once inside the body of interest
        try:
            while data := await r.read(65536):
                data = bytearray(data)
                start = 0
                if body_pos is None and (direction == "request" or state["put_sent"]):
                    scan += data
                    marker = scan.find(b"PUT /v1/replicas/") if direction == "request" else scan.find(b"HTTP/1.1 ")
                    end = scan.find(b"\r\n\r\n", marker) if marker >= 0 else -1
                    if end >= 0:
                        if direction == "request":
                            state["put_sent"] = True
                        start = len(data) - (len(scan) - (end + 4))
                        body_pos = 0
                    elif len(scan) > 1 << 20:
                        del scan[:-65536]
                at = self.flip_request_at if direction == "request" else self.flip_answer_at
                if body_pos is not None and at is not None:
                    i = start + at - body_pos
                    if start <= i < len(data):
                        data[i] ^= 0x01
                        self.flipped += 1
                        if direction == "request":
                            self.flip_request_at = None
                        else:
                            self.flip_answer_at = None
                if body_pos is not None:
                    body_pos += len(data) - start
                w.write(bytes(data))
                await w.drain()
        finally:
            w.close()

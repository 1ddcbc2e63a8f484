"""A change log received as an HTTP body: the TLS listener's chunked ``PUT``, and the token
listener's when the primary does not upgrade (transport/raw.py is the other way in).

Both are an ``IncomingLog`` (transport/endpoints.py): the replica reads the header from it
on the event loop, then has it deliver the rest into a ``LogWriter``. Here receiving and
verifying+writing overlap: one batch of chunks is written in a worker thread while the next
arrives (both cores work, the socket never waits on the disk), and the chunks are kept as
aiohttp hands them over, never joined into one buffer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiohttp import StreamReader
from aiohttp.web_protocol import RequestPayloadError

from .. import workers
from ..errors import TransferStalled, WireError
from ..wire import MAX_HEADER, Header, LogDecoder
from .endpoints import LogWriter

BATCH = 4 << 20  # bytes handed to the writer at once


class BodyLog:
    connection = "http"

    def __init__(self, content: StreamReader, idle_timeout: float):
        """Made in the request's handler, the task that receives the log (``cut`` cancels it)."""
        self._content = content
        self._idle_timeout = idle_timeout
        self._reader = asyncio.current_task()
        self._chunks = self._read()
        self.received = 0

    async def _read(self) -> AsyncIterator[bytes]:
        while True:
            try:
                async with asyncio.timeout(self._idle_timeout):
                    data = await self._content.readany()
            except TimeoutError:
                raise TransferStalled(f"no data for {self._idle_timeout:.0f}s: the transfer stalled") from None
            except RequestPayloadError as e:  # aiohttp could not parse the chunked framing
                raise WireError(f"malformed request body: {e}") from None
            if not data:
                return
            self.received += len(data)
            yield data

    async def read_header(self, dec: LogDecoder) -> tuple[Header, bytes, list]:
        """The header, the bytes read so far, and the items decoded after the header."""
        buf = bytearray()
        async for chunk in self._chunks:
            buf += chunk
            items = dec.feed(chunk)
            for i, item in enumerate(items):
                if isinstance(item, Header):
                    return item, bytes(buf), items[i + 1:]
            if len(buf) > MAX_HEADER + 64 and dec.header is None:
                raise WireError("change-log header too large")
        raise WireError("change log truncated before its header")

    async def deliver(self, writer: LogWriter) -> None:
        """The rest of the body into ``writer``, a batch at a time in a worker thread."""
        pending: asyncio.Future | None = None
        try:
            batch: list[bytes] = []
            size = 0
            async for chunk in self._chunks:
                batch.append(chunk)
                size += len(chunk)
                if size >= BATCH:
                    if pending is not None:
                        await pending
                    pending = asyncio.ensure_future(workers.RECEIVE.run(writer.write, batch))
                    batch, size = [], 0
            if pending is not None:
                await pending
                pending = None
            if batch:
                await workers.RECEIVE.run(writer.write, batch)
        finally:
            if pending is not None:  # never close the file under a write still running
                await asyncio.gather(pending, return_exceptions=True)

    def cut(self) -> None:
        """End the receipt now: its handler is cancelled."""
        if self._reader is not None:
            self._reader.cancel()

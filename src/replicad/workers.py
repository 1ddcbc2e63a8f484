"""Thread pools of their own, one per purpose, each bounded.

Blocking work (file I/O, hashing, a socket read by a thread) never runs on the event loop
(docs/design.md, invariant 6). Through ``asyncio.to_thread`` it all shared the loop's one
default pool — 6 threads on 2 cores — so eight slow log connections of one peer starved
every other peer's cycle, the appliers and the digests alike (issue 13, item 2). Now each
purpose has its own pool: a purpose can wait only on itself.

- ``RECEIVE``: logs being received (a raw connection's reads, verifying, staging). A peer
  holds at most ``transport.client.LOGS_PER_REPLICA`` of them at once (replica/admission.py),
  and the header of a log is read on the event loop, under a deadline, not here.
- ``APPLY``: the appliers (undo, blocks, rollback) of every replica VM.
- ``DIGESTS``: a replica copy read into block digests for a resync, and streamed.
- ``SEND``: the primary's cycles — the capture (freeze hooks included) and the log's
  producer and sender thread.

Everything else (a status file, a folder removed) stays on the loop's default pool.
Sizes are threads, not cores: most of this work waits on a disk or a socket."""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class Pool:
    def __init__(self, name: str, size: int):
        self.name = name
        self.size = size
        self._executor: ThreadPoolExecutor | None = None

    def executor(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=self.size, thread_name_prefix=f"replicad-{self.name}")
        return self._executor

    async def run(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """``fn(*args, **kwargs)`` in this pool, with the caller's context variables (the
        log's bound fields), like ``asyncio.to_thread``."""
        call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self.executor(), call)


RECEIVE = Pool("receive", 32)
APPLY = Pool("apply", 4)
DIGESTS = Pool("digests", 2)
SEND = Pool("send", 16)

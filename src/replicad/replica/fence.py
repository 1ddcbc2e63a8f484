"""Fencing a replica VM's receipts for a failover (issue 14.2): from the moment `failover
start` begins, no log of that VM is acknowledged — a new one is refused at its header, the
one arriving is cut (its connection shut, or its handler cancelled) and nothing of it is
kept — so the point the failover chooses is final. A log already acknowledged is applied
before the point is chosen, or discarded (replica/failovers.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

from ..errors import Conflict


class Fenced(Conflict):
    """A log refused or cut because a failover of its VM is starting."""


@dataclass
class ReceiptFence:
    _fenced: set[str] = field(default_factory=set)
    _inflight: dict[str, tuple[asyncio.Task, Callable[[], None]]] = field(default_factory=dict)
    _cut: set[str] = field(default_factory=set)

    @contextlib.contextmanager
    def receiving(self, vm_id: str, cut: Callable[[], None]) -> Iterator[None]:
        """Around one receipt (under the VM's receive lock): refused at once when fenced,
        and turned into ``Fenced`` when a failover cuts it (``cut``: the incoming log's,
        transport/endpoints.py ``IncomingLog.cut``)."""
        if vm_id in self._fenced:
            raise Fenced(f"a failover of VM {vm_id} is starting on this replica server; it takes no more logs")
        task = asyncio.current_task()
        assert task is not None  # called from a coroutine
        self._inflight[vm_id] = (task, cut)
        try:
            yield
        except (asyncio.CancelledError, Exception) as e:
            if vm_id not in self._cut:
                raise
            self._cut.discard(vm_id)
            if isinstance(e, asyncio.CancelledError) and task is not None:
                task.uncancel()  # our own cut, not a shutdown: the handler answers normally
            raise Fenced(f"a failover of VM {vm_id} started while this log arrived; nothing of it is kept",
                         hint="the primary's next cycle is refused: the copy has failed over") from None
        finally:
            self._inflight.pop(vm_id, None)
            self._cut.discard(vm_id)

    def _cut_inflight(self, vm_id: str) -> None:
        got = self._inflight.get(vm_id)
        if got is None:
            return
        self._cut.add(vm_id)
        got[1]()  # a reading thread fails at once, or the receiving handler is cancelled

    @contextlib.asynccontextmanager
    async def fenced(self, vm_id: str, receive_lock: asyncio.Lock) -> AsyncIterator[None]:
        """Refuse new logs, cut the one arriving, then hold the VM's receive lock: inside,
        nothing of this VM is being received or can be acknowledged."""
        self._fenced.add(vm_id)
        try:
            self._cut_inflight(vm_id)
            async with receive_lock:
                yield
        finally:
            self._fenced.discard(vm_id)

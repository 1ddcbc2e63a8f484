"""What the roles plug into the transport: the protocols it serves and calls.

The transport carries conversations between a primary and a replica server; it knows
neither role. Each role implements the protocol of its side, and the daemon (daemon.py)
hands the implementation to the transport (docs/design.md §1):

- on the replica server, ``transport/server.py`` serves the peer routes by calling a
  ``ReplicaEndpoint`` (implemented by ``replica/service.py``'s ``ReplicaService``); its
  ``LogSink`` part takes change logs, each within a ``LogSlot``, as an ``IncomingLog`` (an
  HTTP body: ``transport/body.py``, or the upgraded connection: ``transport/raw.py``) that
  delivers the log's bytes into the role's ``LogWriter``;
- on the primary, a cycle ships its log with ``LogSender.push`` (implemented by
  ``transport/client.py``'s ``Conversation``), which reads the log from a ``LogSource``
  (implemented by ``primary/producer.py``'s ``CycleProducer``) in a worker thread and
  returns the replica's acknowledgement or raises: the source's own failure as itself (a
  local ``OSError`` as ``errors.local_error``), the network's as ``PeerUnreachable``, a
  refusal as ``PeerError``. Nothing is reported on the side."""

from __future__ import annotations

import asyncio
from collections.abc import Generator
from pathlib import Path
from typing import BinaryIO, Protocol

from ..auth.authorize import Grant
from ..wire import Header, LogDecoder
from .raw import RawLog


class LogSlot(Protocol):
    """One of a principal's logs in flight; the server releases it before it answers."""

    def release(self) -> None: ...


class LogWriter(Protocol):
    """Where a replica keeps a log's bytes as they arrive: each piece goes through the
    log's decoder (the first bad byte raises) and is kept. Called in a worker thread."""

    def write(self, pieces: list[bytes]) -> None:
        """Verify and keep these bytes, the next of the log."""
        ...

    def pull(self, source: RawLog) -> None:
        """Read the rest of the log from a raw connection, up to its trailer."""
        ...


class IncomingLog(Protocol):
    """One change log as it arrives on a peer listener."""

    connection: str  # which way it came, for the log: "http" or "raw"
    received: int    # bytes of it read so far

    async def read_header(self, dec: LogDecoder) -> tuple[Header, bytes, list]:
        """Read up to the log's header through ``dec`` on the event loop: the header, the
        bytes read (verified by ``dec``), and the items decoded after the header."""
        ...

    async def deliver(self, writer: LogWriter) -> None:
        """The rest of the log into ``writer``, up to the end of the log."""
        ...

    def cut(self) -> None:
        """End the receipt at once (a failover fences the VM): the receipt fails."""
        ...


class LogSink(Protocol):
    """Where a replica server's peer listener puts the change logs it receives."""

    def admit(self, principal: str, auth: str, vm_id: str) -> Grant:
        """Whether ``principal`` may send a log for ``vm_id``, from the request alone (before
        any byte of the log is read); raises Refused or Conflict."""
        ...

    def log_slot(self, principal: str) -> LogSlot:
        """A slot for one more log from ``principal``, or Busy (429)."""
        ...

    async def receive(self, grant: Grant, auth: str, vm_id: str, seq: int,
                      incoming: IncomingLog, *, mac_key: bytes | None = None,
                      header_timeout: float = ...) -> dict:
        """Take one log (an HTTP body or the upgraded connection) and return the
        acknowledgement to send, or raise why it was refused."""
        ...


class ReplicaEndpoint(LogSink, Protocol):
    """The replica server's side of the peer protocol (docs/protocol.md), as the peer
    listener calls it once the peer is authenticated."""

    def grant_for(self, principal: str, auth: str) -> Grant:
        """What ``principal`` may do here over ``auth``; raises Refused."""
        ...

    def names(self, principal: str) -> bool:
        """Whether an authorization entry (or `allowed_from_any_server`) names ``principal``."""
        ...

    async def settled(self) -> None:
        """Every state change made so far is durable: called before a peer is told a state."""
        ...

    def status(self, principal: str, auth: str, vm_id: str) -> dict:
        """A replica copy's status as its primary sees it (run in a thread)."""
        ...

    async def digests(self, principal: str, auth: str, vm_id: str, rate: int = 0) -> tuple[dict, list[Path]]:
        """A copy's block digests for a resync or a verify (read at most ``rate`` bytes a
        second, 0: unbounded): its description and the map files to send."""
        ...

    async def discard_segments(self, principal: str, auth: str, vm_id: str) -> dict:
        """A segmented resync's staged segments go (the primary cancelled it)."""
        ...

    def open_map(self, path: Path) -> BinaryIO:
        """One map of a digests answer, as the bytes to send."""
        ...

    def drop_digests(self, maps: list[Path]) -> None:
        """A digests answer was sent or abandoned: its maps go."""
        ...

    async def seed(self, principal: str, auth: str, vm_id: str, doc: dict) -> dict:
        """Adopt a copy already in this server's storage."""
        ...


class SendProgress(Protocol):
    """What a sender reports while a log goes out: bytes sent, and an event it sets."""

    sent: int
    changed: asyncio.Event | None


class LogSource(Protocol):
    """One cycle's change log, produced as it is sent."""

    @property
    def progress(self) -> SendProgress:
        """Where the sender counts what it sent."""
        ...

    def batches(self) -> Generator[list[bytes | memoryview], None, None]:
        """The log as batches of buffers, in order; run in the sender's worker thread. A
        batch may be a view of the source's buffers: sent before the next is asked for.
        The sender closes the generator when it is done, so the source cleans up in the
        thread that read it."""
        ...


class LogSender(Protocol):
    """How a primary ships one cycle's log to its replica server."""

    @property
    def mac_key(self) -> bytes | None:
        """The session key the log's items are MAC'd with (token listener), else None."""
        ...

    async def push(self, vm_id: str, seq: int, log: LogSource, *, bandwidth_limit: int = 0) -> dict:
        """Send log ``seq`` of ``vm_id``; return the replica's acknowledgement (its checked
        answer) or raise."""
        ...

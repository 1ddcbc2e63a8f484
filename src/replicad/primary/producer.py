"""Builds one cycle's change log from the disks: scan → encode → byte batches.

``batches()`` is a plain generator run step by step in worker threads (see
``stream_batches``), so reading, hashing and compressing never block the event loop and
memory stays at one read chunk plus one output batch."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ReplicadError, ResyncRequired
from ..model import VM, Consistency
from ..tracking.digestmap import DigestMapReader
from ..tracking.scan import DataChange, DiskScan, Resize, ZeroChange
from ..wire import DiskInfo, Header, LogEncoder
from .baseline import Baselines

BATCH = 1 << 20


@dataclass
class Progress:
    """What a cycle has done so far; read by ``--wait`` progress bars."""

    kind: str = ""
    seq: int = 0
    total: int = 0      # bytes of disk to examine
    scanned: int = 0    # bytes of disk examined
    sent: int = 0       # log bytes handed to the transport
    done: bool = False
    changed: asyncio.Event | None = field(default=None, repr=False)


def local_error(e: OSError) -> ReplicadError:
    """A local I/O failure while building a log (disk unreadable, state_dir full)."""
    where = f" {e.filename}" if e.filename else ""
    err = ReplicadError(f"local I/O error{where}: {e.strerror or e}")
    err.transient = True
    return err


class CycleProducer:
    def __init__(self, vm: VM, baselines: Baselines, *, seq: int, base_seq: int, epoch: str,
                 kind: str, time: str, compress: bool, progress: Progress, frequency: int = 0):
        self.vm, self.baselines = vm, baselines
        self.seq, self.base_seq, self.epoch, self.kind, self.time = seq, base_seq, epoch, kind, time
        self.compress = compress
        self.frequency = frequency
        self.progress = progress
        self.fuzzy = False
        self.data_bytes = 0
        self.error: BaseException | None = None  # what stopped the producer, if anything
        self.mac_key: bytes | None = None         # the session key on the token transport
        self.prepared = False                     # the final log before a planned failover
        self.primary_ports: tuple[int, int] = (0, 0)
        self.replica_maps: list[Path] | None = None  # resync: the replica's own digests as the baseline
        self.history: tuple[int, int] = (0, 3600)
        self._readers: list[DigestMapReader | None] = []
        self._opened: tuple[list[DiskScan], Header] | None = None

    def open(self) -> Header:
        """Open every disk and build the header, before any connection is made: a missing
        disk or baseline is reported as what it is, not as a network failure."""
        try:
            self._opened = self._open()
        except OSError as e:
            raise local_error(e) from None
        return self._opened[1]

    def _open(self) -> tuple[list[DiskScan], Header]:
        paths = [Path(d.path) for d in self.vm.disks]
        if self.kind == "initial":
            self._readers = [None] * len(paths)
        elif self.replica_maps is not None:
            readers = [DigestMapReader.open(p) for p in self.replica_maps]
            if len(readers) != len(paths) or any(r is None for r in readers):
                raise ReplicadError("the replica's digest maps are damaged or do not match the disks")
            self._readers = readers
        else:
            readers = self.baselines.readers(self.base_seq, len(paths))
            if readers is None:
                raise ResyncRequired(f"the digest maps of acknowledged cycle {self.base_seq} are missing",
                                     hint="run `replicad replication resync`")
            self._readers = readers
        tmp = self.baselines.begin(self.seq)
        scans = [DiskScan(p, r, tmp / Baselines.map_name(i)) for i, (p, r) in enumerate(zip(paths, self._readers))]
        try:
            idents = [s.open() for s in scans]
        except OSError as e:
            for s in scans:
                s.close()
            raise ReplicadError(f"cannot open disk {e.filename}: {e.strerror}") from None
        self.progress.total = sum(
            i.size for s, i in zip(scans, idents) if not (s.old is not None and s.old.identity == i))
        header = Header(self.vm.id, self.vm.name, self.epoch, self.seq, self.base_seq, self.kind, self.time,
                        Consistency.CRASH.value,
                        tuple(DiskInfo(i, p.name, ident.size) for i, (p, ident) in enumerate(zip(paths, idents))),
                        self.frequency, prepared=self.prepared, primary_ports=self.primary_ports,
                        history=self.history)
        return scans, header

    def batches(self) -> Iterator[bytes]:
        scans, header = self._opened or self._open()
        try:
            enc = LogEncoder(header, compress=self.compress, mac_key=self.mac_key)
            out = bytearray(enc.start())
            for i, scan in enumerate(scans):
                last = 0
                for ch in scan.changes():
                    if isinstance(ch, DataChange):
                        out += enc.data(i, ch.offset, ch.data)
                    elif isinstance(ch, ZeroChange):
                        out += enc.zero(i, ch.offset, ch.length)
                    elif isinstance(ch, Resize):
                        out += enc.resize(i, ch.size)
                    if len(out) >= BATCH:
                        self.progress.scanned += scan.read_bytes - last
                        last = scan.read_bytes
                        yield bytes(out)
                        out.clear()
                self.progress.scanned += scan.read_bytes - last
                self.fuzzy |= scan.fuzzy
            self.data_bytes = enc.data_bytes
            # the maps become durable before the trailer can be acknowledged (baseline.py)
            self.baselines.seal(self.seq)
            out += enc.finish()
            yield bytes(out)
        finally:
            for s in scans:
                s.close()
            for r in self._readers:
                if r is not None:
                    r.close()


async def stream_batches(producer: CycleProducer, *, bandwidth_limit: int = 0) -> AsyncIterator[bytes]:
    """Run the producer in worker threads one step ahead of the sender."""
    loop = asyncio.get_running_loop()
    it = producer.batches()
    sentinel = object()
    fut = loop.run_in_executor(None, next, it, sentinel)
    started = loop.time()
    try:
        while True:
            try:
                chunk = await fut
            except OSError as e:
                producer.error = local_error(e)  # the transport wraps it; the engine reports this
                raise producer.error from None
            except Exception as e:  # not CancelledError: aiohttp cancels the writer on an early answer
                producer.error = e
                raise
            if chunk is sentinel:
                return
            fut = loop.run_in_executor(None, next, it, sentinel)
            producer.progress.sent += len(chunk)
            if producer.progress.changed is not None:
                producer.progress.changed.set()
            yield chunk
            if bandwidth_limit:
                # pace to the configured rate: how long these bytes should have taken so far
                ahead = producer.progress.sent / bandwidth_limit - (loop.time() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)
    finally:
        try:
            await fut
        except BaseException:  # noqa: BLE001 — the first error was already raised to the sender
            pass
        await loop.run_in_executor(None, it.close)

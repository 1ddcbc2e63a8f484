"""The replica role: accept change logs from authorized primaries, stage them durably,
acknowledge, and apply them in sequence (one applier task per replica VM)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import secrets
import shutil
import ssl
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from .. import log as logmod
from .. import metrics, workers
from ..auth.authorize import Grant, authorize
from ..catalog import Catalog
from ..errors import (
    Conflict,
    FailedOver,
    ResumeRefused,
    ResyncRequired,
    StorageError,
    TransferStalled,
    UsageError,
    WireError,
)
from ..fsutil import durable_rename, fsync_dir, fsync_file, write_atomic
from ..images import disk_format
from ..model import (
    VM,
    Disk,
    Relationship,
    ReplicationMode,
    ReplicationState,
    VMState,
    valid_disk_name,
    valid_fqdn,
    valid_vm_name,
)
from ..monitoring import roll as roll_interval
from ..server_settings import ServerSettings
from ..times import utcnow
from ..tracking.digestmap import open_stream
from ..tracking.scan import digest_disks
from ..transport.raw import RawLog
from ..wire import MAX_HEADER, Header, LogDecoder, Record
from . import missing, points
from .admission import Admission, LogSlot
from .apply import discard, read_log, rollback, write_point
from .copywriter import CopyWriter
from .failover import identities
from .fence import ReceiptFence
from .layout import PROGRESS_FILE, VMDir
from .seeding import SeedRefused, adopt, seed_sizes

log = logmod.get("replicad.replica")
STAGE_BATCH = 4 << 20
PROGRESS_EVERY = 32 << 20           # bytes between progress points: at most this much is resent
APPLY_RETRY_MAX = 60.0
HEADER_TIMEOUT = 10.0  # seconds for a log's whole header (listen.*.header_timeout)


@dataclass
class Staging:
    """A log being received: bytes go to ``<seq>.log.part`` and through the decoder."""

    part: Path
    decoder: LogDecoder
    fd: int

    def write(self, data: bytes | list[bytes], *, decoded: bool = False) -> None:
        """Verify (unless the decoder already saw these bytes) and append to the staged file."""
        for piece in data if isinstance(data, list) else [data]:
            if not decoded:
                self.decoder.feed(piece)  # raises WireError on the first bad byte
            view = memoryview(piece)
            while view:
                n = os.write(self.fd, view)
                view = view[n:]

    def pull(self, source: RawLog) -> None:
        """Receive the rest of the log from a raw connection, up to its trailer."""
        while self.decoder.trailer is None:
            piece = source.recv(STAGE_BATCH)
            if not piece:
                raise ConnectionResetError("the primary closed the connection in the middle of the log")
            self.write(piece)

    def finish(self, final: Path) -> None:
        self.decoder.close()
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        durable_rename(self.part, final)

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.part.unlink(missing_ok=True)


@dataclass
class DirectInitial:
    """An initial log written straight into a copy that has no committed point yet.

    Staging it first would write every byte twice (log, then copy) and read it back once;
    with no earlier point to protect, the records go to the disks as they are verified and
    the copy is committed when the trailer verifies and the disks are fsynced. A crash or a
    refused log leaves a copy that was never committed: the primary starts over."""

    decoder: LogDecoder
    writers: list[CopyWriter]
    folder: Path
    progress_path: Path | None = None  # where durable progress is recorded, for a resume
    progress_meta: dict | None = None  # what binds it: epoch, seq, the peer
    _at: tuple[int, int] = (0, 0)      # end of the last record applied: (disk, offset)
    _unsynced: int = 0

    @classmethod
    def open(cls, vmdir: VMDir, header: Header, decoder: LogDecoder, meta: dict) -> DirectInitial:
        vmdir.create()
        if header.resume is None:  # a new attempt: an older attempt's progress means nothing now
            (vmdir.root / PROGRESS_FILE).unlink(missing_ok=True)
        writers: list[CopyWriter] = []
        try:
            for d in header.disks:
                # a resume keeps what the interrupted attempt made durable
                writers.append(CopyWriter(vmdir.disk(d.name), d.size, truncate=header.resume is None))
        except BaseException:
            for w in writers:
                w.close()
            raise
        return cls(decoder, writers, vmdir.disks, vmdir.root / PROGRESS_FILE, meta, header.resume or (0, 0))

    def apply(self, items) -> None:
        for item in items:
            if isinstance(item, Record):
                self.writers[item.disk].record(item)
                self._advance(item)

    def _record_progress(self) -> None:
        """Make everything so far durable, then say so: a broken connection resumes here.
        The fsync and the note run in the writer's thread after the writes they cover,
        while receiving goes on (replica/copywriter.py)."""
        disk, offset = self._at
        path, meta = self.progress_path, self.progress_meta
        assert path is not None and meta is not None  # set together by open(); _advance checks
        doc = json.dumps({**meta, "disk": disk, "offset": offset}).encode()
        for i, w in enumerate(self.writers):
            if i != disk:
                w.sync()  # earlier disks are complete (the log goes disk by disk)

        def durable() -> None:
            fsync_dir(self.folder)
            write_atomic(path, doc, 0o600)
        self.writers[disk].checkpoint(durable)
        self._unsynced = 0

    def write(self, data: bytes | list[bytes], *, decoded: bool = False) -> None:
        if not decoded:
            for piece in data if isinstance(data, list) else [data]:
                self.apply(self.decoder.feed(piece))

    def pull(self, source: RawLog) -> None:
        """Receive the rest of the log from a raw connection: each data record is read from
        the socket straight into its disk's write buffer (wire/codec.py ``pull``)."""
        def placed(item: Record) -> None:
            self.writers[item.disk].filled(item.length)  # verified, and in the buffer already
            self._advance(item)
        for item in self.decoder.pull(source.read_into, lambda d, o, n: self.writers[d].slot(o, n), placed):
            self.apply([item])

    def _advance(self, item: Record) -> None:
        self._at = (item.disk, item.offset + item.length)
        self._unsynced += item.length
        if self._unsynced >= PROGRESS_EVERY and self.progress_path is not None:
            self._record_progress()

    def finish(self, final: Path) -> None:
        self.decoder.close()
        for w in self.writers:
            w.sync()
        self.abort()
        fsync_dir(self.folder)

    def abort(self) -> None:
        for w in self.writers:
            w.close()
        self.writers = []


class ReplicaService:
    def __init__(self, catalog: Catalog, state_dir: Path, fault: Callable[[str], None], host: str = ""):
        self.catalog = catalog
        self.state_dir = state_dir
        self.host = host  # this replica server's name, for messages a primary shows
        self._fault = fault
        self._locks: dict[str, asyncio.Lock] = {}        # one receipt at a time per VM
        self._apply_locks: dict[str, asyncio.Lock] = {}  # held while a log is being applied
        self._applied: dict[str, asyncio.Condition] = {}  # notified after every commit
        self._wake: dict[str, asyncio.Event] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self.admission = Admission(catalog, state_dir,
                                   lambda vm_id: vm_id in self._locks and self._locks[vm_id].locked())
        self.fence = ReceiptFence()  # a failover's hold on the VM's receipts (replica/fence.py)

    # lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Resume every replica VM: drop half-received logs, finish interrupted applies, and
        the leftovers of first copies that left nothing to resume."""
        for claim in self.admission.recover():
            await asyncio.to_thread(shutil.rmtree, VMDir.of(claim.storage, claim.vm_id).root, True)
            log.info("replica.recover.dropped", vm=claim.name, vm_id=claim.vm_id, file=claim.vm_id,
                     reason="an interrupted first copy with nothing durable to resume from")
        for rel in self.catalog.relationships():
            if rel.role == "replica":
                await asyncio.to_thread(self._recover_files, rel)
                await self._check_copy(rel.vm_id)
                self._ensure_applier(rel.vm_id)

    @staticmethod
    def _recover_files(rel: Relationship) -> None:
        """Drop what a crash left behind: half-received logs (the primary resends them), the
        staged logs of committed points, and undo logs below the oldest kept recovery point."""
        vmdir = VMDir.of(rel.storage, rel.vm_id)
        undo_floor = rel.points[0]["seq"] if rel.points else rel.applied_seq
        for folder, floor in ((vmdir.logs, rel.applied_seq), (vmdir.undo, undo_floor)):
            if not folder.exists():
                continue
            for p in folder.iterdir():
                seq = int(p.name[:12]) if p.name[:12].isdigit() else None
                if p.name.endswith(".part") or seq is None or seq <= floor:
                    p.unlink()
                    log.info("replica.recover.dropped", vm=rel.vm_id, file=f"{folder.name}/{p.name}",
                             reason="interrupted write" if p.name.endswith(".part") else "no longer needed")

    async def stop(self) -> None:
        for t in self._tasks.values():
            t.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        self._tasks.clear()

    def _ensure_applier(self, vm_id: str) -> None:
        if vm_id not in self._tasks or self._tasks[vm_id].done():
            self._wake.setdefault(vm_id, asyncio.Event()).set()
            self._tasks[vm_id] = asyncio.create_task(self._applier(vm_id), name=f"apply:{vm_id}")

    # receiving (transport/endpoints.py: ReplicaEndpoint) ---------------------------------
    def grant_for(self, principal: str, auth: str) -> Grant:
        return self.admission.grant(principal, auth)

    def names(self, principal: str) -> bool:
        """Whether an authorization entry (or `allowed_from_any_server`) names ``principal``."""
        return self.admission.names(principal)

    def log_slot(self, principal: str) -> LogSlot:
        """A slot for one more log from ``principal``, or Busy (replica/admission.py)."""
        return self.admission.log_slot(principal)

    def admit(self, principal: str, auth: str, vm_id: str) -> Grant:
        """Whether ``principal`` may send a log for ``vm_id`` (replica/admission.py)."""
        return self.admission.log_request(principal, auth, vm_id)

    async def receive(self, grant: Grant, auth: str, vm_id: str, seq: int,
                      chunks: AsyncIterator[bytes] | RawLog, *, mac_key: bytes | None = None,
                      header_timeout: float = HEADER_TIMEOUT) -> dict:
        """Stage one change log from ``chunks`` (an HTTP body's chunks, or a raw connection:
        transport/raw.py) for a peer ``admit`` let in; returns the acknowledgement. With
        ``mac_key`` (token transport) every item's MAC must verify against the session key.
        The header is read on the event loop within ``header_timeout`` seconds overall, and
        before the VM's lock is taken: a slow header holds no lock and no thread."""
        principal = grant.principal
        lock = self._locks.setdefault(vm_id, asyncio.Lock())
        head_bytes: bytes | bytearray
        try:
            try:
                async with asyncio.timeout(header_timeout):
                    if isinstance(chunks, RawLog):
                        dec = LogDecoder(mac_key=mac_key, require_mac=mac_key is not None)
                        header, head_bytes = await chunks.read_header(dec)
                        first_items: list = []
                    else:
                        header, dec, head_bytes, first_items = await self._read_header(chunks, mac_key)
            except TimeoutError:
                raise TransferStalled(f"the header of log {seq} was not complete within {header_timeout:g}s "
                                      "(the listener's header_timeout): the transfer stalled") from None
            except ConnectionError:
                raise TransferStalled(f"the connection was lost before log {seq}'s header arrived; "
                                      "nothing of it is kept") from None
            async with lock:
                with self.fence.receiving(vm_id, chunks if isinstance(chunks, RawLog) else None):
                    return await self._receive_locked(grant, auth, vm_id, seq, chunks, header, dec, head_bytes,
                                                      first_items)
        except WireError as e:
            rel = self.catalog.relationship(vm_id)
            if rel is not None and rel.trust_group == grant.trust_group:
                rel.stats.errors += 1
                self.catalog.put_relationship(rel)
            log.warning("log.rejected", vm_id=vm_id, peer=principal, cycle=seq, reason=str(e),
                        result="nothing of this log is kept or applied")
            raise

    async def _read_header(self, chunks: AsyncIterator[bytes],
                           mac_key: bytes | None) -> tuple[Header, LogDecoder, bytearray, list]:
        """The header, the decoder, the bytes read so far and the items decoded after the header."""
        dec = LogDecoder(mac_key=mac_key, require_mac=mac_key is not None)
        buf = bytearray()
        async for chunk in chunks:
            buf += chunk
            items = dec.feed(chunk)
            for i, item in enumerate(items):
                if isinstance(item, Header):
                    return item, dec, buf, items[i + 1:]
            if len(buf) > MAX_HEADER + 64 and dec.header is None:
                raise WireError("change-log header too large")
        raise WireError("change log truncated before its header")

    async def _receive_locked(self, grant: Grant, auth: str, vm_id: str, seq: int,
                              chunks: AsyncIterator[bytes] | RawLog, header: Header, dec: LogDecoder,
                              head_bytes: bytes | bytearray, first_items: list) -> dict:
        raw = chunks if isinstance(chunks, RawLog) else None
        connection = "raw" if raw is not None else "http"  # for the log: which receive path ran
        if header.vm_id != vm_id or header.seq != seq:
            raise WireError("change-log header does not match the request")
        # whose VM this is, before anything about it (its state, its name's owner) shows
        self.admission.check(grant, vm_id, header.vm_name, held=vm_id)
        self.admission.check_quota(grant, vm_id, header.vm_name, [(d.name, d.size) for d in header.disks])
        vm = self.catalog.vm_by_id(vm_id)
        rel = self.catalog.relationship(vm_id)
        bound = log.bind(vm=header.vm_name, peer=grant.principal, cycle=seq)
        if rel is not None and rel.state in (ReplicationState.FAILED_OVER_WAITING, ReplicationState.FAILED_OVER):
            raise FailedOver(f"{header.vm_name} has failed over on this replica server; it takes no more logs",
                           hint="reverse replication from the replica, or stop the failover there")
        if rel is not None and rel.state == ReplicationState.SUSPENDED:
            raise Conflict(f"replication of {header.vm_name} is suspended on the replica server",
                           hint="run `replicad replication resume` on the replica")
        if header.kind == "initial":
            if header.base_seq != 0:
                raise WireError("an initial log must have base 0")
            storage = Path(grant.storage)
            if rel is not None:
                await self._reset_for_initial(rel)
            else:  # a first copy: its id and name are this primary's from now on, also while pending
                self.admission.claim(grant, vm_id, header.vm_name, storage, sum(d.size for d in header.disks))
        else:
            if rel is None or vm is None:
                raise ResyncRequired(f"this replica server has no copy of VM {header.vm_name}")
            if [d.name for d in header.disks] != [p.name for p in vm.files()] or header.config != bool(vm.config_file):
                raise ResyncRequired("the VM's disk set changed")
            if gone := await self._check_copy(vm_id, peer=grant.principal):
                raise ResyncRequired(missing.message(vm, gone, self.host))
            if header.kind == "resync":  # builds on whatever this copy holds, in any epoch
                if header.base_seq != rel.applied_seq or rel.applied_seq != rel.seq:
                    raise ResyncRequired(f"resync log builds on point {header.base_seq}; this copy is at "
                                         f"{rel.applied_seq} (acknowledged {rel.seq})")
            elif header.epoch != rel.epoch or header.base_seq != rel.seq:
                raise ResyncRequired(f"log {seq} builds on {header.epoch}/{header.base_seq}, the replica has "
                                     f"{rel.epoch}/{rel.seq}")
            elif rel.copy_identity and rel.applied_seq == rel.seq:
                now = await workers.RECEIVE.run(identities, vm.files())
                if now != rel.copy_identity:
                    raise ResyncRequired(f"the replica copy of {header.vm_name} was modified outside replicad "
                                         "since its last point")
            storage = Path(rel.storage)
        vmdir = VMDir.of(storage, vm_id)
        fresh_dir = not vmdir.root.exists()
        received = len(head_bytes)
        direct = header.kind == "initial" and (rel is None or rel.applied_seq == 0)
        meta = {"epoch": header.epoch, "seq": seq, "peer": grant.principal}
        if header.resume is not None:
            got = await workers.RECEIVE.run(read_progress, vmdir.root / PROGRESS_FILE)
            if (not direct or got is None or {k: got.get(k) for k in meta} != meta
                    or tuple(header.resume) > (got["disk"], got["offset"])):
                bound.warning("initial.resume_refused", resume=list(header.resume), progress=got,
                              reason="no durable progress of this peer, epoch and log reaches that point")
                raise ResumeRefused(f"this replica server holds no resumable initial copy of {header.vm_name} "
                                    f"from {grant.principal} up to {list(header.resume)}",
                                    hint="the primary starts the initial copy over")
        staging: DirectInitial | Staging
        try:
            if direct:
                staging = await workers.RECEIVE.run(DirectInitial.open, vmdir, header, dec, meta)
                await workers.RECEIVE.run(staging.apply, first_items)
            else:
                staging = await workers.RECEIVE.run(self._open_staging, vmdir, seq, dec)
            try:
                await workers.RECEIVE.run(staging.write, bytes(head_bytes), decoded=True)
                if isinstance(chunks, RawLog):  # read and written by one worker thread, straight from the socket
                    await chunks.run(staging.pull, chunks)
                    received = chunks.received
                else:
                    received += await self._pump(chunks, staging)
                await workers.RECEIVE.run(staging.finish, vmdir.log(seq))
            except BaseException:
                await workers.RECEIVE.run(staging.abort)
                raise
        except BaseException as e:
            resumable = direct and (vmdir.root / PROGRESS_FILE).exists()
            if not resumable:  # nothing of a refused first log stays behind, nor its claim
                if fresh_dir:
                    await workers.RECEIVE.run(shutil.rmtree, vmdir.root, True)
                if rel is None:
                    self.admission.release(vm_id)
            else:
                bound.info("initial.interrupted", progress=await workers.RECEIVE.run(read_progress,
                                                                                   vmdir.root / PROGRESS_FILE),
                           reason="what was made durable stays; the primary's next attempt resumes there")
            if isinstance(e, ssl.SSLError):  # a record that failed TLS's own MAC: bytes changed in transit
                raise WireError(f"log {seq} was corrupted in transit: TLS refused a record "
                                f"({e.reason or e}); nothing of it is kept") from None
            if isinstance(e, ConnectionError):
                raise TransferStalled(f"the connection was lost while log {seq} arrived; "
                                      "nothing of it is kept") from None
            if isinstance(e, OSError):
                raise StorageError(f"replica storage error while staging log {seq}: {e.strerror}") from None
            raise
        if header.kind == "initial":
            rel = self._create_replica(grant, header, storage, rel)
        trailer = dec.trailer
        assert trailer is not None  # finish() closed the decoder on a verified trailer
        if direct:  # already in the copy: commit it now (the applier has nothing to do)
            rel = self.catalog.require_relationship(vm_id)
            rel.seq = seq
            rel.auth = auth
            rel.frequency = header.frequency or rel.frequency
            rel.primary_ports = list(header.primary_ports) if any(header.primary_ports) else rel.primary_ports
            self.catalog.put_relationship(rel)
            final = dataclasses.replace(header, consistency="fuzzy") if trailer.fuzzy else header
            facts = await workers.RECEIVE.run(self._copy_facts, vm_id)
            await workers.RECEIVE.run(points.drop_undo, vmdir, self._commit(vm_id, final, facts))
            (vmdir.root / PROGRESS_FILE).unlink(missing_ok=True)
            bound.info("log.acknowledged", bytes=received, records=dec.records, base=0, applied="while received",
                       connection=connection)
            metrics.recorder.log_received(header.vm_name, received)
            bound.info("log.applied", kind=header.kind, point=header.time, consistency=final.consistency)
            cond = self._applied.setdefault(vm_id, asyncio.Condition())
            async with cond:
                cond.notify_all()
            return {"acked_seq": seq, "applied_seq": seq, "bytes": received}
        rel = self.catalog.require_relationship(vm_id)
        rel.seq = seq
        rel.epoch = header.epoch  # a resync starts the primary's new epoch here
        rel.error = None
        rel.frequency = header.frequency or rel.frequency
        rel.auth = auth
        rel.primary_ports = list(header.primary_ports) if any(header.primary_ports) else rel.primary_ports
        if header.prepared and not trailer.fuzzy:  # a fuzzy capture is no state to fail over to
            rel.prepared_seq = seq
            bound.info("failover.primary_prepared", reason="the primary shipped its final log; a planned failover "
                       "can start once it is applied")
        self.catalog.put_relationship(rel)
        bound.info("log.acknowledged", bytes=received, records=dec.records, base=header.base_seq,
                   connection=connection)
        metrics.recorder.log_received(header.vm_name, received)
        self._ensure_applier(vm_id)
        self._wake[vm_id].set()
        return {"acked_seq": seq, "applied_seq": rel.applied_seq, "bytes": received}

    @staticmethod
    async def _pump(chunks: AsyncIterator[bytes], staging: Staging | DirectInitial) -> int:
        """Feed an HTTP body to ``staging``; returns the bytes received. Receiving and
        verifying+writing overlap: one batch is written in a worker thread while the next
        arrives (both cores work, the socket never waits on the disk)."""
        pending: asyncio.Future | None = None
        received = 0
        try:
            batch: list[bytes] = []  # the chunks as received: never copied into one buffer
            size = 0
            async for chunk in chunks:
                batch.append(chunk)
                size += len(chunk)
                received += len(chunk)
                if size >= STAGE_BATCH:
                    if pending is not None:
                        await pending
                    pending = asyncio.ensure_future(workers.RECEIVE.run(staging.write, batch))
                    batch, size = [], 0
            if pending is not None:
                await pending
                pending = None
            if batch:
                await workers.RECEIVE.run(staging.write, batch)
        finally:
            if pending is not None:  # never close the file under a write still running
                await asyncio.gather(pending, return_exceptions=True)
        return received

    @staticmethod
    def _open_staging(vmdir: VMDir, seq: int, dec: LogDecoder) -> Staging:
        vmdir.create()
        part = vmdir.log_part(seq)
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        return Staging(part, dec, fd)

    async def _reset_for_initial(self, rel: Relationship) -> None:
        """A restarted initial replication: the old chain is dead; drop its staged and undo
        logs, never under the feet of an apply in progress."""
        old = VMDir.of(rel.storage, rel.vm_id)
        def drop() -> None:
            for p in (old.logs, old.undo):
                shutil.rmtree(p, ignore_errors=True)
        async with self._apply_locks.setdefault(rel.vm_id, asyncio.Lock()):
            await workers.RECEIVE.run(drop)
        rel.applied_seq = rel.seq = 0
        self.catalog.put_relationship(rel)

    def _create_replica(self, grant: Grant, header: Header, storage: Path, old: Relationship | None) -> Relationship:
        """Record the replica VM of a verified initial log (or reset it for a new epoch)."""
        return self._register(grant, header.vm_id, header.vm_name, [(d.name, d.size) for d in header.disks],
                              header.config, storage, header.epoch, old, how="initial log", extended=header.extended)

    def _register(self, grant: Grant, vm_id: str, name: str, files: list[tuple[str, int]], config: bool,
                  storage: Path, epoch: str, old: Relationship | None, *, how: str,
                  extended: bool = False) -> Relationship:
        vmdir = VMDir.of(storage, vm_id)
        disks = files[:-1] if config else files
        mode = ReplicationMode.EXTENDED_REPLICA if extended else ReplicationMode.REPLICA
        vm = VM(id=vm_id, name=name, mode=mode, state=VMState.OFF,  # a replica VM never runs here unless failed over
                disks=[Disk(str(vmdir.disk(n)), size, "raw") for n, size in disks],
                config_file=str(vmdir.disk(files[-1][0])) if config else None)
        rel = Relationship(vm_id=vm_id, role="replica", state=ReplicationState.INITIAL_IN_PROGRESS,
                           primary_server=grant.principal, trust_group=grant.trust_group, storage=str(storage),
                           epoch=epoch, seq=0, applied_seq=0, extended=extended)
        if old is not None:
            rel.stats = old.stats
        self.catalog.put_vm_and_relationship(vm, rel)
        self.admission.release(vm_id)  # the relationship binds the VM to its primary from now on
        self.catalog.audit(grant.principal, "replica.created", f"{name} ({vm_id}) in {storage} from {how}")
        log.info("replica.vm_created", vm=name, peer=grant.principal, storage=str(vmdir.root),
                 trust_group=grant.trust_group, source=how)
        return rel

    async def seed(self, principal: str, auth: str, vm_id: str, doc: dict) -> dict:
        """Adopt a copy already in this server's storage as the replica of a primary's VM
        (`start-initial --use-existing`): the files in ``<storage>/<vm name>/`` named like the
        VM's files become the replica copy, at point 0; the primary then resyncs against
        their digests. Only storage the primary's authorization entry grants is looked at."""
        grant = self.grant_for(principal, auth)
        name, files, config = doc.get("vm_name"), doc.get("files"), doc.get("config", False)
        if (not isinstance(name, str) or not valid_vm_name(name) or not isinstance(files, list)
                or not 0 < len(files) <= 64 or not all(isinstance(f, str) and valid_disk_name(f) for f in files)
                or len(set(files)) != len(files) or not isinstance(config, bool) or (config and len(files) < 2)):
            raise UsageError("malformed seed request")
        try:
            uuid.UUID(vm_id)
        except ValueError:
            raise UsageError("malformed VM id") from None
        storage = Path(grant.storage)
        async with self._locks.setdefault(vm_id, asyncio.Lock()):
            self.admission.check(grant, vm_id, name, held=vm_id)
            rel = self.catalog.relationship(vm_id)
            if rel is not None:
                if rel.role == "replica" and rel.applied_seq == 0:
                    return {"vm_id": vm_id, "found": None, "adopted": "already"}  # a retried request
                raise Conflict(f"this replica server already has VM {name} ({vm_id})")
            source = storage / name
            vmdir = VMDir.of(storage, vm_id)
            sizes = await asyncio.to_thread(seed_sizes, source, files)
            self.admission.check_quota(grant, vm_id, name, list(zip(files, sizes, strict=True)))
            try:
                found = await asyncio.to_thread(adopt, source, vmdir, files)
            except SeedRefused as e:
                log.warning("seed.refused", vm=name, peer=principal, file=str(e.path), reason=str(e))
                raise
            if not found:
                raise Conflict(f"no existing copy of {name} in {source} on {grant.principal}'s storage",
                               hint=f"put the copy's files ({', '.join(files)}) in {source} on the replica "
                                    "server, or start a normal initial replication")
            sizes = [vmdir.disk(f).stat().st_size for f in files]
            self._register(grant, vm_id, name, list(zip(files, sizes, strict=True)), config, storage, "", None,
                           how=f"existing copy {source}")
        log.info("replica.seeded", vm=name, peer=principal, found=found, created_empty=len(files) - len(found),
                 reason="the primary's first cycle compares digests and ships only the blocks that differ")
        return {"vm_id": vm_id, "found": found}

    def status(self, principal: str, auth: str, vm_id: str) -> dict:
        grant = self.grant_for(principal, auth)
        self.admission.check(grant, vm_id, partner_ok=True)
        rel = self.catalog.relationship(vm_id)
        out: dict = {"vm_id": vm_id, "exists": False}
        if rel is not None and rel.role == "replica":
            out = {"vm_id": vm_id, "exists": True, "epoch": rel.epoch, "acked_seq": rel.seq,
                   "applied_seq": rel.applied_seq, "state": rel.state.value, "prepared_seq": rel.prepared_seq}
        if rel is None or (rel.role == "replica" and rel.applied_seq == 0):
            vmdir = VMDir.of(Path(rel.storage) if rel else Path(grant.storage), vm_id)
            got = read_progress(vmdir.root / PROGRESS_FILE)
            if got is not None and got.get("peer") == principal:  # only the peer that sent it
                out["initial_progress"] = {k: got[k] for k in ("epoch", "seq", "disk", "offset")}
        return out

    # applying -------------------------------------------------------------------------------
    async def _applier(self, vm_id: str) -> None:
        wake = self._wake[vm_id]
        delay = 1.0
        while True:
            await wake.wait()
            wake.clear()
            while True:
                rel = self.catalog.relationship(vm_id)
                vm = self.catalog.vm_by_id(vm_id)
                if rel is None or vm is None or rel.role != "replica" or rel.applied_seq >= rel.seq \
                        or rel.state in (ReplicationState.FAILED_OVER_WAITING, ReplicationState.FAILED_OVER):
                    break
                seq = rel.applied_seq + 1
                vmdir = VMDir.of(rel.storage, vm_id)
                disks = vm.files()
                bound = log.bind(vm=vm.name, cycle=seq)
                if await self._check_copy(vm_id):
                    break  # nothing applies to a missing file: the primary's resync recreates it
                try:
                    async with self._apply_locks.setdefault(vm_id, asyncio.Lock()):
                        now = self.catalog.relationship(vm_id)
                        if now is None or now.seq < seq or now.state in (ReplicationState.FAILED_OVER_WAITING,
                                                                          ReplicationState.FAILED_OVER):
                            continue  # a failover took the copy while this waited (replica/failovers.py)
                        header = await workers.APPLY.run(write_point, vmdir, seq, disks, fault=self._fault)
                        # the commit runs here, on the loop: no other writer of this row can
                        # interleave (a receipt may be recording the next ack right now)
                        facts = await workers.APPLY.run(self._copy_facts, vm_id)
                        floor = self._commit(vm_id, header, facts)
                        self._fault("after-commit")
                        await workers.APPLY.run(discard, vmdir, seq)
                        await workers.APPLY.run(points.drop_undo, vmdir, floor)
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # noqa: BLE001 — one VM's failure never stops the daemon
                    reason = e.strerror if isinstance(e, OSError) else str(e)
                    bound.error("apply.failed", reason=reason, retry_in=delay)
                    await workers.APPLY.run(self._rollback_quietly, vmdir, seq, disks)
                    rel = self.catalog.relationship(vm_id)
                    if rel is not None:
                        rel.error = f"applying log {seq} failed: {reason}"
                        rel.stats.errors += 1
                        self.catalog.put_relationship(rel)
                    try:
                        await asyncio.wait_for(wake.wait(), timeout=delay)
                    except TimeoutError:
                        pass
                    wake.clear()
                    delay = min(delay * 2, APPLY_RETRY_MAX)
                    cond = self._applied.setdefault(vm_id, asyncio.Condition())
                    async with cond:  # a failover waiting for this apply decides now (replica/failovers.py)
                        cond.notify_all()
                    continue
                delay = 1.0
                bound.info("log.applied", kind=header.kind, point=header.time, consistency=header.consistency)
                cond = self._applied.setdefault(vm_id, asyncio.Condition())
                async with cond:
                    cond.notify_all()

    @staticmethod
    def _rollback_quietly(vmdir: VMDir, seq: int, disks: list[Path]) -> None:
        try:
            if rollback(vmdir, seq, disks):
                log.warning("apply.rolled_back", cycle=seq, reason="copy restored to the previous point")
        except OSError as e:
            log.error("apply.rollback_failed", cycle=seq, reason=e.strerror)

    def _copy_facts(self, vm_id: str) -> tuple[list[str], list]:
        """What the commit records about the copy's files (formats, identities): file reads,
        done in a worker thread before the commit (the apply lock keeps them still)."""
        vm = self.catalog.require_vm(vm_id)
        return [disk_format(Path(d.path)) for d in vm.disks], identities(vm.files())

    def _commit(self, vm_id: str, header: Header, facts: tuple[list[str], list]) -> int:
        """Step 3 of the apply: point ``header.seq`` is now the copy's committed state.
        Returns the undo-log floor of recovery-point retention. Runs on the loop: no other
        writer of this row can interleave; ``facts`` come from ``_copy_facts``."""
        rel = self.catalog.require_relationship(vm_id)
        s = ServerSettings.load(self.catalog, self.state_dir)
        roll_interval(rel, s.monitoring_start_time, s.monitoring_interval)
        # the copy before an initial copy or a resync is not known to be any point (it may hold
        # a hand edit or a cancelled failover's writes): only a delta keeps it (issue 14.7)
        previous = ({"seq": rel.applied_seq, "time": rel.last_point_time or rel.last_replication_time,
                     "consistency": rel.last_consistency}
                    if rel.applied_seq and rel.last_replication_time and header.kind == "delta" else None)
        asked, rel.recovery_point_interval = header.history
        kept = min(asked, s.max_recovery_history)  # `server set --max-recovery-history`
        if kept < asked and rel.recovery_history != kept:
            log.warning("recovery.history_capped", vm=header.vm_name, peer=rel.primary_server, asked=asked,
                        kept=kept, reason="this replica server keeps at most that many older recovery points")
        rel.recovery_history = kept
        rel.applied_seq = header.seq
        rel.error = None
        rel.last_replication_time = utcnow()
        rel.last_point_time = header.time  # a point's time is its capture's, not its apply's
        rel.copy_unverified = False
        if rel.state in (ReplicationState.INITIAL_IN_PROGRESS, ReplicationState.ERROR):
            rel.state = ReplicationState.REPLICATING
        rel.stats.successful_count += 1
        vm = self.catalog.require_vm(vm_id)
        formats, rel.copy_identity = facts
        for d, info, fmt in zip(vm.disks, header.disks, formats, strict=False):  # header: a config file too
            d.size = info.size
            d.format = fmt
        rel.last_consistency = header.consistency
        if header.kind != "delta":
            rel.points = []  # an initial copy or a resync starts a new chain
            rel.discard_ok = False
        floor = points.retain(rel, previous, rel.recovery_history, rel.recovery_point_interval)
        self.catalog.put_vm_and_relationship(vm, rel)
        return floor

    async def drained(self, vm_id: str, *, or_failed: bool = False) -> None:
        """Wait until every acknowledged log of the VM is applied (the caller bounds the wait,
        ``async with asyncio.timeout(...)``); with ``or_failed``, also return when an apply
        failed (its error is recorded)."""
        cond = self._applied.setdefault(vm_id, asyncio.Condition())

        def done() -> bool:
            r = self.catalog.relationship(vm_id)
            return r is None or r.applied_seq >= r.seq or (or_failed and r.error is not None)
        async with cond:
            await cond.wait_for(done)

    async def digests(self, principal: str, auth: str, vm_id: str) -> tuple[dict, list[Path]]:
        """The block digests of a replica copy as it is now, for a resync: every acknowledged
        log applied first, then the copy read under the apply lock. Returns (meta, map files)."""
        grant = self.grant_for(principal, auth)
        self.admission.check(grant, vm_id, partner_ok=True)
        rel = self.catalog.relationship(vm_id)
        vm = self.catalog.vm_by_id(vm_id)
        if rel is None or vm is None or rel.role != "replica":
            raise ResyncRequired("this replica server has no copy of that VM")
        if rel.state in (ReplicationState.FAILED_OVER_WAITING, ReplicationState.FAILED_OVER):
            raise Conflict(f"{vm.name} has failed over on this replica server")
        gone = await asyncio.to_thread(missing.missing_files, vm)
        if gone:
            await self._recreate_missing(vm, gone, principal)
        async with asyncio.timeout(600):
            await self.drained(vm_id)
        # a folder of this answer's own (concurrent answers never share maps); compressed
        # maps: never-written regions cost nothing to store; dropped once sent (drop_digests)
        folder = VMDir.of(rel.storage, vm_id).root / "resync" / secrets.token_hex(8)
        async with self.apply_lock(vm_id):
            rel = self.catalog.relationship(vm_id)
            if rel is None:  # removed while the acknowledged logs were applied
                raise ResyncRequired("this replica server has no copy of that VM")
            try:
                written = await workers.DIGESTS.run(digest_disks, vm.files(), folder, compress=True)
            except BaseException:
                await workers.DIGESTS.run(shutil.rmtree, folder, True)
                raise
            now = await workers.DIGESTS.run(identities, vm.files())
        maps = [m for m, _ in written]
        # written outside replicad since the last point (a hand edit, a restore, a cancelled
        # failover's writes): the primary's automatic resync waits for the operator then; a
        # file that was missing held nothing to keep
        modified = bool(rel.copy_identity) and not missing.unmodified(rel.copy_identity, now, gone)
        log.info("resync.digests", vm=vm.name, peer=principal, point=rel.applied_seq, modified=modified,
                 reason="the primary compares these with its disks and ships only what differs")
        return {"applied_seq": rel.applied_seq, "epoch": rel.epoch, "modified": modified,
                "discard_ok": rel.discard_ok, "sizes": [n for _, n in written]}, maps

    @staticmethod
    def open_map(path: Path):
        """A map of a digests answer, as the bytes to send (it is stored compressed)."""
        return open_stream(path, compressed=True)

    @staticmethod
    def drop_digests(maps: list[Path]) -> None:
        """A digests answer was sent (or abandoned): nothing of it stays."""
        if maps:
            shutil.rmtree(maps[0].parent, ignore_errors=True)

    async def import_initial(self, name: str, folder: Path, actor: str) -> tuple[VM, Relationship]:
        """`import-initial`: load an exported initial copy from media as if it had arrived
        from its primary; authorization entries decide storage and trust group as usual."""
        try:
            meta = json.loads((folder / f"{name}.json").read_text())
            primary, vm_id = str(meta["primary"]).lower(), str(meta["vm_id"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UsageError(f"{folder} holds no exported copy of {name} ({e})") from None
        if not valid_fqdn(primary) or meta.get("vm_name") != name:
            raise UsageError(f"{folder / (name + '.json')} does not describe {name}")
        s = ServerSettings.load(self.catalog, self.state_dir)
        grant = authorize(primary, enabled=s.enabled, allow_any=s.allowed_from_any_server,
                          default_storage=Path(s.default_storage), entries=self.catalog.entries())
        src = folder / f"{name}.rlog"
        try:
            header = await asyncio.to_thread(_verify_log, src)
        except OSError as e:
            raise UsageError(f"cannot read {src}: {e.strerror}") from None
        if header.vm_id != vm_id or header.vm_name != name or header.kind != "initial":
            raise WireError(f"{src} is not the initial copy of {name}")
        async with self._locks.setdefault(vm_id, asyncio.Lock()):
            self.admission.check(grant, vm_id, name, held=vm_id)  # the log line names the owner
            rel = self.catalog.relationship(vm_id)
            if rel is not None:
                await self._reset_for_initial(rel)
            vmdir = VMDir.of(grant.storage, vm_id)
            await asyncio.to_thread(_stage_copy, src, vmdir, header.seq)
            rel = self._create_replica(grant, header, Path(grant.storage), rel)
            rel.seq, rel.epoch = header.seq, header.epoch
            self.catalog.put_relationship(rel)
        self.catalog.audit(actor, "replica.imported", f"{name} ({vm_id}) from {src}")
        log.info("replica.imported", vm=name, primary=primary, folder=str(folder),
                 reason="the primary's first network cycle will be a resync shipping only what changed")
        self._ensure_applier(vm_id)
        self._wake[vm_id].set()
        return self.catalog.require_vm(vm_id), rel

    async def _check_copy(self, vm_id: str, peer: str | None = None) -> list[int]:
        """The indexes of the copy's files that are gone, each named in the log and in the
        relationship's error (replica/missing.py)."""
        vm = self.catalog.vm_by_id(vm_id)
        if vm is None:
            return []
        gone = await asyncio.to_thread(missing.missing_files, vm)
        if gone:  # recorded on the loop: no other writer of the row can interleave
            missing.record(self.catalog, vm, gone, self.host, peer)
        return gone

    async def _recreate_missing(self, vm: VM, gone: list[int], principal: str) -> None:
        """Before a resync's digests: the logs received but not applied can never apply (their
        file is gone) and the resync supersedes them; the files come back empty."""
        async with self.apply_lock(vm.id):
            rel = self.catalog.require_relationship(vm.id)
            await asyncio.to_thread(missing.drop_logs, VMDir.of(rel.storage, vm.id), rel.applied_seq, rel.seq)
            rel.seq = rel.applied_seq
            self.catalog.put_relationship(rel)
            await asyncio.to_thread(missing.recreate, vm, gone, principal)

    def start_vm(self, vm_id: str) -> None:
        """Start applying for a VM that just became a replica here (reverse)."""
        self._ensure_applier(vm_id)

    async def stop_vm(self, vm_id: str) -> None:
        """Stop applying for a VM that stops being a replica here (reverse); files stay."""
        task = self._tasks.pop(vm_id, None)
        if task:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def apply_lock(self, vm_id: str) -> asyncio.Lock:
        """Held while a log is applied: hold it to see the copy at a committed point."""
        return self._apply_locks.setdefault(vm_id, asyncio.Lock())

    def receive_lock(self, vm_id: str) -> asyncio.Lock:
        """Held while a log of the VM is received (a failover fences with it: replica/fence.py)."""
        return self._locks.setdefault(vm_id, asyncio.Lock())

    async def remove(self, vm_id: str) -> None:
        """Forget a replica VM and delete its copy (``vm remove`` on the replica)."""
        rel = self.catalog.relationship(vm_id)
        await self.stop_vm(vm_id)
        if rel is not None and rel.role == "replica":
            await asyncio.to_thread(self._delete_copy, Path(rel.storage), vm_id)

    @staticmethod
    def _delete_copy(storage: Path, vm_id: str) -> None:
        shutil.rmtree(VMDir.of(storage, vm_id).root, ignore_errors=True)
        if storage.exists():
            fsync_dir(storage)


def read_progress(path: Path) -> dict | None:
    """An initial copy's durable progress, or None (absent or unreadable: start over)."""
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    ok = (isinstance(doc, dict) and isinstance(doc.get("epoch"), str) and isinstance(doc.get("peer"), str)
          and all(isinstance(doc.get(k), int) and not isinstance(doc.get(k), bool) for k in ("seq", "disk", "offset")))
    return doc if ok else None


def _verify_log(path: Path) -> Header:
    """Decode a whole log from media (checksums, digest, bounds); returns its header."""
    header = None
    for item in read_log(path):
        if header is None and isinstance(item, Header):  # the decoder's first item
            header = item
    if header is None:
        raise WireError(f"{path} holds no change-log header")
    return header


def _stage_copy(src: Path, vmdir: VMDir, seq: int) -> None:
    vmdir.create()
    part = vmdir.log_part(seq)
    shutil.copyfile(src, part)
    fsync_file(part)
    durable_rename(part, vmdir.log(seq))

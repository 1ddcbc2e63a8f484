"""Receiving a change log on the replica (transport/endpoints.py ``LogSink.receive``): the
header read within the listener's deadline before any lock, then under the VM's receive
lock the header checked against the request, the VM's owner, quotas and state; the rest of
the log verified and kept (replica/staging.py) and acknowledged. A staged log is applied by
the VM's applier (replica/applier.py); an initial copy received straight into the copy is
committed here."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import ssl
from pathlib import Path

from .. import log as logmod
from .. import metrics, workers
from ..auth.authorize import Grant
from ..catalog import Catalog
from ..errors import (
    Conflict,
    FailedOver,
    ResumeRefused,
    ResyncRequired,
    StorageError,
    TransferStalled,
    WireError,
)
from ..model import ReplicationState
from ..tracking.digestmap import identities
from ..transport.endpoints import IncomingLog
from ..wire import Header, LogDecoder
from . import disk_set, group_points, missing, points, segments
from .admission import Admission
from .adoption import Adoption
from .applier import Applier
from .fence import ReceiptFence
from .layout import PROGRESS_FILE, VMDir
from .staging import DirectInitial, Staging, read_progress

log = logmod.get("replicad.replica")
HEADER_TIMEOUT = 10.0  # seconds for a log's whole header (listen.*.header_timeout)


class Receiving:
    def __init__(self, catalog: Catalog, admission: Admission, applier: Applier, adoption: Adoption,
                 fence: ReceiptFence, locks: dict[str, asyncio.Lock], host: str = ""):
        self.catalog = catalog
        self.admission = admission
        self.applier = applier
        self.adoption = adoption
        self.fence = fence
        self._locks = locks  # the VMs' receive locks: one receipt at a time per VM
        self.host = host     # this replica server's name, for messages a primary shows

    async def receive(self, grant: Grant, auth: str, vm_id: str, seq: int, incoming: IncomingLog, *,
                      mac_key: bytes | None = None, header_timeout: float = HEADER_TIMEOUT) -> dict:
        """Stage one change log from ``incoming`` for a peer ``admit`` let in; returns the
        acknowledgement. With ``mac_key`` (token transport) every item's MAC must verify
        against the session key. The header is read on the event loop within
        ``header_timeout`` seconds overall, and before the VM's lock is taken: a slow header
        holds no lock and no thread."""
        lock = self._locks.setdefault(vm_id, asyncio.Lock())
        try:
            try:
                async with asyncio.timeout(header_timeout):
                    dec = LogDecoder(mac_key=mac_key, require_mac=mac_key is not None)
                    header, head_bytes, first_items = await incoming.read_header(dec)
            except TimeoutError:
                raise TransferStalled(f"the header of log {seq} was not complete within {header_timeout:g}s "
                                      "(the listener's header_timeout): the transfer stalled") from None
            except ConnectionError:
                raise TransferStalled(f"the connection was lost before log {seq}'s header arrived; "
                                      "nothing of it is kept") from None
            async with lock:
                with self.fence.receiving(vm_id, incoming.cut):
                    return await self._receive_locked(grant, auth, vm_id, seq, incoming, header, dec, head_bytes,
                                                      first_items)
        except WireError as e:
            rel = self.catalog.relationship(vm_id)
            if rel is not None and rel.trust_group == grant.trust_group:
                rel.stats.errors += 1
                await self.catalog.put_relationship(rel)
            log.warning("log.rejected", vm_id=vm_id, peer=grant.principal, cycle=seq, reason=str(e),
                        result="nothing of this log is kept or applied")
            raise

    async def _receive_locked(self, grant: Grant, auth: str, vm_id: str, seq: int, incoming: IncomingLog,
                              header: Header, dec: LogDecoder, head_bytes: bytes, first_items: list) -> dict:
        if header.vm_id != vm_id or header.seq != seq:
            raise WireError("change-log header does not match the request")
        # whose VM this is, before anything about it (its state, its name's owner) shows
        self.admission.check(grant, vm_id, header.vm_name, held=vm_id)
        self.admission.check_quota(grant, vm_id, header.vm_name, [(d.name, d.size) for d in header.disks])
        group_points.check(self.admission, grant, header)  # a group may name only this peer's replica VMs
        vm = self.catalog.vm_by_id(vm_id)
        rel = self.catalog.relationship(vm_id)
        bound = log.bind(vm=header.vm_name, peer=grant.principal, cycle=seq)
        if rel is not None and rel.state in (ReplicationState.FAILED_OVER_WAITING, ReplicationState.FAILED_OVER):
            raise FailedOver.of(header.vm_name)
        if rel is not None and rel.state == ReplicationState.SUSPENDED:
            raise Conflict(f"replication of {header.vm_name} is suspended on the replica server",
                           hint="run `replicad replication resume` on the replica")
        if header.kind == "initial":
            if header.base_seq != 0:
                raise WireError("an initial log must have base 0")
            storage = Path(grant.storage)
            if rel is not None:
                await self.adoption.reset_for_initial(rel)
            else:  # a first copy: its id and name are this primary's from now on, also while pending
                await self.admission.claim(grant, vm_id, header.vm_name, storage, sum(d.size for d in header.disks))
        else:
            if rel is None or vm is None:
                raise ResyncRequired(f"this replica server has no copy of VM {header.vm_name}")
            files = disk_set.plan(vm, VMDir.of(rel.storage, vm_id), header)  # refuses a name out of its folder
            if files.changed:
                await workers.RECEIVE.run(disk_set.check_new, files)
                bound.info("log.disks_change", added=[files.paths[i].name for i in files.added],
                           removed=[p.name for p in files.removed],
                           reason="the primary changed the VM's disks: the new set comes with this point")
            if gone := await self.applier.check_copy(vm_id, peer=grant.principal):
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
        writer: Staging | DirectInitial
        try:
            if direct:  # the header's bytes are in no file; the records after it go to the disks
                writer = await workers.RECEIVE.run(DirectInitial.open, vmdir, header, dec, meta, first_items)
            elif header.segment is not None:  # a segmented resync's: staged beside the others
                assert vm is not None  # a resync needs the copy (checked above)
                writer = await workers.RECEIVE.run(segments.open_staging, vmdir, header, grant.principal, vm.files(),
                                                   dec, head_bytes)
            else:  # the header's bytes begin the staged log
                writer = await workers.RECEIVE.run(Staging.open, vmdir, seq, dec, head_bytes)
            try:
                await incoming.deliver(writer)
                await workers.RECEIVE.run(writer.finish)
            except BaseException:
                await workers.RECEIVE.run(writer.abort)
                raise
        except BaseException as e:
            resumable = direct and (vmdir.root / PROGRESS_FILE).exists()
            if not resumable:  # nothing of a refused first log stays behind, nor its claim
                if fresh_dir:
                    await workers.RECEIVE.run(shutil.rmtree, vmdir.root, True)
                if rel is None:
                    await self.admission.release(vm_id)
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
        received = incoming.received
        if header.segment is not None:
            index, last = header.segment[1], header.segment[2]
            bound.info("resync.segment_staged", segment=index, bytes=received, last=last,
                       connection=incoming.connection,
                       reason="staged, not applied: the copy stays at its last point until the resync's last segment")
            if not last:
                metrics.recorder.log_received(header.vm_name, received)
                return {"segment": index, "held": index + 1, "bytes": received}
            assert vm is not None
            await workers.RECEIVE.run(segments.merge, vmdir, seq, index + 1, files.paths)
        elif header.kind != "initial":  # a log that is no segment supersedes a resync staged in segments
            await workers.RECEIVE.run(segments.discard, vmdir)
        if header.kind == "initial":
            rel = await self.adoption.create_replica(grant, header, storage, rel)
        trailer = dec.trailer
        assert trailer is not None  # finish() closed the decoder on a verified trailer
        if direct:  # already in the copy: commit it now (the applier has nothing to do)
            rel = self.catalog.require_relationship(vm_id)
            rel.seq = seq
            rel.auth = auth
            rel.frequency = header.frequency or rel.frequency
            rel.retention = header.retention  # the grid the primary asks for (replica/points.py)
            rel.primary_ports = list(header.primary_ports) if any(header.primary_ports) else rel.primary_ports
            await self.catalog.put_relationship(rel)
            final = dataclasses.replace(header, consistency="fuzzy") if trailer.fuzzy else header
            facts = await workers.RECEIVE.run(self.applier.copy_facts, vm_id)
            await workers.RECEIVE.run(points.drop_undo, vmdir, await self.applier.commit(vm_id, final, facts))
            # `verify --at-rest`: the digests of the whole new copy, after this answer (issue 18)
            await self.applier.record_copy_later(vm_id, vmdir, seq, header.epoch,
                                                 self.catalog.require_vm(vm_id).files())
            (vmdir.root / PROGRESS_FILE).unlink(missing_ok=True)
            bound.info("log.acknowledged", bytes=received, records=dec.records, base=0, applied="while received",
                       connection=incoming.connection)
            metrics.recorder.log_received(header.vm_name, received)
            bound.info("log.applied", kind=header.kind, point=header.time, consistency=final.consistency)
            await self.applier.notify_applied(vm_id)
            return {"acked_seq": seq, "applied_seq": seq, "bytes": received}
        rel = self.catalog.require_relationship(vm_id)
        rel.seq = seq
        rel.epoch = header.epoch  # a resync starts the primary's new epoch here
        rel.error = None
        rel.frequency = header.frequency or rel.frequency
        rel.retention = header.retention  # the grid the primary asks for (replica/points.py)
        rel.auth = auth
        rel.primary_ports = list(header.primary_ports) if any(header.primary_ports) else rel.primary_ports
        if header.prepared and not trailer.fuzzy:  # a fuzzy capture is no state to fail over to
            rel.prepared_seq = seq
            bound.info("failover.primary_prepared", reason="the primary shipped its final log; a planned failover "
                       "can start once it is applied")
        await self.catalog.put_relationship(rel)
        if header.segment is not None:  # put together in log `seq`, acknowledged: the segments go
            await workers.RECEIVE.run(segments.discard, vmdir)
        bound.info("log.acknowledged", bytes=received, records=dec.records, base=header.base_seq,
                   connection=incoming.connection)
        metrics.recorder.log_received(header.vm_name, received)
        self.applier.wake(vm_id, seq, writer.runs if isinstance(writer, Staging) and header.segment is None else None)
        return {"acked_seq": seq, "applied_seq": rel.applied_seq, "bytes": received}

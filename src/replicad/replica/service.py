"""The replica role: accept change logs from authorized primaries, stage them durably,
acknowledge, and apply them in sequence (one applier task per replica VM).

``ReplicaService`` is what the peer listener calls (transport/endpoints.py
``ReplicaEndpoint``) and what the rest of the daemon holds; each job is a module of its own:
admission (replica/admission.py: whose VM this is, quotas, log slots), receiving
(replica/receiving.py, into replica/staging.py's writers), applying and the commit
(replica/applier.py), adoption (replica/adoption.py: a replica VM registered, seeded from
an existing copy, imported from media). Here: recovery at start, status, and the digests
a resync compares."""

from __future__ import annotations

import asyncio
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from .. import log as logmod
from .. import workers
from ..auth.authorize import Grant
from ..catalog import Catalog
from ..errors import FailedOver, ResyncRequired
from ..fsutil import fsync_dir
from ..model import VM, Relationship, ReplicationState
from ..replication_states import Resume, Suspend, transition
from ..tracking.digestmap import identities, open_stream
from ..tracking.scan import digest_disks
from ..transport.endpoints import IncomingLog
from . import missing, segments
from .admission import Admission, LogSlot
from .adoption import Adoption
from .applier import Applier
from .fence import ReceiptFence
from .layout import PROGRESS_FILE, VMDir
from .receiving import HEADER_TIMEOUT, Receiving
from .staging import read_progress

log = logmod.get("replicad.replica")


class ReplicaService:
    def __init__(self, catalog: Catalog, state_dir: Path, fault: Callable[[str], None], host: str = ""):
        self.catalog = catalog
        self.state_dir = state_dir
        self.host = host  # this replica server's name, for messages a primary shows
        self._locks: dict[str, asyncio.Lock] = {}  # one receipt at a time per VM
        self.admission = Admission(catalog, state_dir,
                                   lambda vm_id: vm_id in self._locks and self._locks[vm_id].locked())
        self.fence = ReceiptFence()  # a failover's hold on the VM's receipts (replica/fence.py)
        self.applier = Applier(catalog, state_dir, fault, host)
        self.adoption = Adoption(catalog, state_dir, self.admission, self.applier, self.receive_lock)
        self.receiving = Receiving(catalog, self.admission, self.applier, self.adoption, self.fence, self._locks,
                                   host)

    # lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Resume every replica VM: drop half-received logs, finish interrupted applies, and
        the leftovers of first copies that left nothing to resume."""
        for claim in await self.admission.recover():
            await asyncio.to_thread(shutil.rmtree, VMDir.of(claim.storage, claim.vm_id).root, True)
            log.info("replica.recover.dropped", vm=claim.name, vm_id=claim.vm_id, file=claim.vm_id,
                     reason="an interrupted first copy with nothing durable to resume from")
        for rel in self.catalog.relationships():
            if rel.role == "replica":
                await asyncio.to_thread(self._recover_files, rel)
                await self.applier.check_copy(rel.vm_id)
                self.applier.ensure(rel.vm_id)

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
        await self.applier.stop()

    def start_vm(self, vm_id: str) -> None:
        """Start applying for a VM that just became a replica here (reverse)."""
        self.applier.ensure(vm_id)

    async def stop_vm(self, vm_id: str) -> None:
        """Stop applying for a VM that stops being a replica here (reverse); files stay."""
        await self.applier.stop_vm(vm_id)

    # the peer protocol (transport/endpoints.py: ReplicaEndpoint) -----------------------------
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

    async def receive(self, grant: Grant, auth: str, vm_id: str, seq: int, incoming: IncomingLog, *,
                      mac_key: bytes | None = None, header_timeout: float = HEADER_TIMEOUT) -> dict:
        """Stage one change log for a peer ``admit`` let in (replica/receiving.py)."""
        return await self.receiving.receive(grant, auth, vm_id, seq, incoming, mac_key=mac_key,
                                            header_timeout=header_timeout)

    async def seed(self, principal: str, auth: str, vm_id: str, doc: dict) -> dict:
        """Adopt a copy already in this server's storage (replica/adoption.py)."""
        return await self.adoption.seed(self.grant_for(principal, auth), vm_id, doc)

    async def settled(self) -> None:
        await self.catalog.settled()

    def status(self, principal: str, auth: str, vm_id: str) -> dict:
        grant = self.grant_for(principal, auth)
        self.admission.check(grant, vm_id, partner_ok=True)
        rel = self.catalog.relationship(vm_id)
        out: dict = {"vm_id": vm_id, "exists": False}
        if rel is not None and rel.role == "replica":
            out = {"vm_id": vm_id, "exists": True, "epoch": rel.epoch, "acked_seq": rel.seq,
                   "applied_seq": rel.applied_seq, "state": rel.state.value, "prepared_seq": rel.prepared_seq}
        if rel is not None and rel.role == "replica" and (staged := segments.held(VMDir.of(rel.storage, vm_id),
                                                                                   principal)):
            out["segments"] = staged  # a segmented resync's, staged here (primary/resync_progress.py)
        if rel is None or (rel.role == "replica" and rel.applied_seq == 0):
            vmdir = VMDir.of(Path(rel.storage) if rel else Path(grant.storage), vm_id)
            got = read_progress(vmdir.root / PROGRESS_FILE)
            if got is not None and got.get("peer") == principal:  # only the peer that sent it
                out["initial_progress"] = {k: got[k] for k in ("epoch", "seq", "disk", "offset")}
        return out

    async def discard_segments(self, principal: str, auth: str, vm_id: str) -> dict:
        """`resync --cancel` on the primary: the segments of its resync staged here go."""
        grant = self.grant_for(principal, auth)
        self.admission.check(grant, vm_id, partner_ok=True)
        rel = self.catalog.relationship(vm_id)
        if rel is None or rel.role != "replica":
            return {"discarded": 0}
        async with self.receive_lock(vm_id):  # not while one arrives
            n = await workers.RECEIVE.run(segments.discard, VMDir.of(rel.storage, vm_id), principal)
        log.warning("resync.segments_discarded", vm_id=vm_id, peer=principal, segments=n,
                    reason="the primary cancelled its resync; the copy stays at its last point")
        return {"discarded": n}

    async def digests(self, principal: str, auth: str, vm_id: str, rate: int = 0) -> tuple[dict, list[Path]]:
        """The block digests of a replica copy as it is now, for a resync or a verify: every
        acknowledged log applied first, then the copy read under the apply lock (at most
        ``rate`` bytes a second, 0: unbounded). Returns (meta, map files)."""
        grant = self.grant_for(principal, auth)
        self.admission.check(grant, vm_id, partner_ok=True)
        rel = self.catalog.relationship(vm_id)
        vm = self.catalog.vm_by_id(vm_id)
        if rel is None or vm is None or rel.role != "replica":
            raise ResyncRequired("this replica server has no copy of that VM")
        if rel.state in (ReplicationState.FAILED_OVER_WAITING, ReplicationState.FAILED_OVER):
            # `failedover`, as a log's refusal says: a primary whose next cycle is a resync learns
            # it here (the condition of an unplanned reverse), not only from a delta's refusal
            raise FailedOver.of(vm.name)
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
                written = await workers.DIGESTS.run(digest_disks, vm.files(), folder, compress=True, rate=rate)
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
                "discard_ok": rel.discard_ok, "sizes": [n for _, n in written],
                "files": vm.copy_names()}, maps

    @staticmethod
    def open_map(path: Path) -> BinaryIO:
        """A map of a digests answer, as the bytes to send (it is stored compressed)."""
        return open_stream(path, compressed=True)

    @staticmethod
    def drop_digests(maps: list[Path]) -> None:
        """A digests answer was sent (or abandoned): nothing of it stays."""
        if maps:
            shutil.rmtree(maps[0].parent, ignore_errors=True)

    async def _recreate_missing(self, vm: VM, gone: list[int], principal: str) -> None:
        """Before a resync's digests: the logs received but not applied can never apply (their
        file is gone) and the resync supersedes them; the files come back empty."""
        async with self.apply_lock(vm.id):
            rel = self.catalog.require_relationship(vm.id)
            await asyncio.to_thread(missing.drop_logs, VMDir.of(rel.storage, vm.id), rel.applied_seq, rel.seq)
            rel.seq = rel.applied_seq
            await self.catalog.put_relationship(rel)
            await asyncio.to_thread(missing.recreate, vm, gone, principal)

    # for the API, failovers and reverse ------------------------------------------------------
    async def import_initial(self, name: str, folder: Path, actor: str) -> tuple[VM, Relationship]:
        """`import-initial`: an exported initial copy from media (replica/adoption.py)."""
        return await self.adoption.import_initial(name, folder, actor)

    async def change(self, rel: Relationship, event: Suspend | Resume) -> Relationship:
        """An operator's verb (suspend, resume) on a replica relationship: its transition
        (replication_states; Conflict when the state refuses it), recorded."""
        assert rel.role == "replica", rel.role
        rel = transition(rel, event)
        await self.catalog.put_relationship(rel)
        return rel

    async def drained(self, vm_id: str, *, or_failed: bool = False) -> None:
        """Wait until every acknowledged log of the VM is applied (replica/applier.py)."""
        await self.applier.drained(vm_id, or_failed=or_failed)

    def apply_lock(self, vm_id: str) -> asyncio.Lock:
        """Held while a log is applied: hold it to see the copy at a committed point."""
        return self.applier.lock(vm_id)

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

"""The ``qemu`` tracker behind the ChangeTracker seam (tracking/tracker.py): a VM whose
disks are block nodes of a running QEMU process. QEMU records what the guest writes in a
dirty bitmap per disk; a cycle reads only those blocks, from a point-in-time view.

Bitmaps: ``replicad.<N>`` records the writes since the capture of cycle N. The capture of
cycle S, in one QMP transaction over every disk of the VM: ``replicad.<S>`` starts,
``replicad.<base>`` stops, and a backup job with ``sync: none`` puts a copy-before-write
filter over the disk, targeting a fleecing image (qcow2, its backing the disk): reading
the fleecing node gives the disk as it was at that instant, while the guest writes on
(image fleecing). That node is exported read-only over NBD (a unix socket), with
``replicad.<base>`` as its ``qemu:dirty-bitmap:`` meta context: the cycle reads exactly
the dirty extents of the view. Initial copies and resyncs read the whole view instead
(tracking/scan.py over NBD), against the replica's digests for a resync.

Never a lost write: ``commit`` (the replica acknowledged S) removes ``replicad.<base>``.
An abandoned or unacknowledged cycle removes nothing: the next ``begin``, given the
acknowledged baseline B, merges every newer ``replicad.<X>`` back into ``replicad.<B>``
(and drops older ones) in one transaction, so whatever the crash, the writes since B's
capture are in ``replicad.<B>``. A missing or ``inconsistent`` bitmap (QEMU restarted on
a raw disk, whose bitmaps live in memory only; QEMU killed; removed by hand) makes the
next cycle a resync, never a silent gap. Exports, jobs and fleecing nodes are removed
when the cycle closes, and by the next ``begin`` after a replicad killed mid-cycle."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..errors import ResyncRequired
from . import fleece
from .baselines import Baselines
from .digestmap import DigestMapReader, FileIdentity
from .guest_agent import GuestAgent, GuestAgentError
from .qemu import BITMAP_PREFIX, GRANULARITY, BlockNode, NbdView, QemuDisks, QemuError, Qmp, cleanup, tidy
from .qemu_at_rest import AtRest
from .scan import CHUNK, DiskScan
from .tracker import CHUNK_DONE, Change, ChunkDone, CyclePlan, DataChange, Resize, ZeroChange

FLEECE = "qemu-fleece"
_ZERO = bytes(CHUNK)


def bitmap(seq: int) -> str:
    return f"{BITMAP_PREFIX}{seq}"


def bitmap_seq(name: str) -> int | None:
    rest = name[len(BITMAP_PREFIX):] if name.startswith(BITMAP_PREFIX) else ""
    return int(rest) if rest.isdigit() else None


def object_prefix(vm_id: str) -> str:
    """What the names of a VM's QEMU objects (exports, jobs, fleecing nodes) start with."""
    return f"replicad-{vm_id[:8]}-"


def removals(nodes: list[BlockNode], below: int | None = None) -> list[dict[str, Any]]:
    """Transaction actions removing replicad's bitmaps from ``nodes``: all of them, or only
    those of cycles before ``below``."""
    return [{"type": "block-dirty-bitmap-remove", "data": {"node": n.node, "name": b["name"]}}
            for n in nodes for b in n.bitmaps
            if (s := bitmap_seq(b["name"])) is not None and (below is None or s < below)]


async def remove_bitmaps(q: Qmp, nodes: list[BlockNode], below: int | None = None) -> None:
    """``removals`` in one transaction (none when there is nothing to remove)."""
    actions = removals(nodes, below)
    if actions:
        await q.execute("transaction", {"actions": actions})


def resolve(nodes: list[BlockNode], disks: QemuDisks) -> list[BlockNode]:
    """Each disk's node now, by name, else by image path."""
    out = []
    for name, path in disks.disks:
        found = next((n for n in nodes if n.node == name and n.path == path), None) \
            or next((n for n in nodes if n.path == path), None)
        if found is None:
            raise QemuError(f"disk {path} (node {name}) is not open in the QEMU process at {disks.qmp}")
        out.append(found)
    return out


class NbdDiskScan(DiskScan):
    """The scan of a whole disk (initial copy, resync) read from its NBD view."""

    zero_fill = False  # one NBD read per super-block run, not one per data part (round trips)

    def __init__(self, view: NbdView, identity: FileIdentity, old: DigestMapReader | None, new_map: Path,
                 *, start: int = 0):
        super().__init__(Path(new_map), old, new_map, start=start)
        self.view = view
        self.identity = identity
        self.captured = True
        self._open_flag = True

    def open(self) -> FileIdentity:
        assert self.identity is not None
        return self.identity

    def is_open(self) -> bool:
        return True

    def close(self) -> None:
        pass

    def _regions(self, fd: int, size: int, start: int) -> Iterator[tuple[int, int]]:
        return self.view.data_regions(start)

    def _read(self, fd: int, into: memoryview, pos: int) -> int:
        return self.view.read_into(into, pos)


class QemuView:
    """One disk's point-in-time view for this cycle."""

    captured = True
    fuzzy = False

    def __init__(self, cycle: QemuCycle, index: int, node: BlockNode, view: NbdView, dirty_count: int | None):
        self._cycle, self._i, self._node, self._view = cycle, index, node, view
        self._dirty_count = dirty_count  # None: read whole (initial copy, resync)
        self.read_bytes = 0
        self._identity = FileIdentity(view.size, 0, 0, 0, 0)

    @property
    def identity(self) -> FileIdentity:
        return self._identity

    @property
    def unchanged(self) -> bool:
        old = self._cycle.old_sizes
        return self._dirty_count == 0 and old is not None and old[self._i] == self._view.size

    def moved_since_capture(self) -> bool:
        return False  # every disk of the VM is captured in one transaction

    def changes(self) -> Iterator[Change | ChunkDone]:
        plan = self._cycle.plan
        if self._dirty_count is None:
            old = self._cycle.replica_map(self._i)
            scan = NbdDiskScan(self._view, self._identity, old, self._cycle.scratch / f"full{self._i}.map",
                               start=self._cycle.start(self._i))
            try:
                for ch in scan.changes(boundaries=True):
                    self.read_bytes = scan.read_bytes
                    yield ch
            finally:
                if old is not None:
                    old.close()
            self.read_bytes = scan.read_bytes
            return
        old_sizes = self._cycle.old_sizes
        if old_sizes is not None and old_sizes[self._i] != self._view.size:
            yield Resize(self._view.size)
        if self._dirty_count == 0 or plan.initial:
            return
        buf = bytearray(CHUNK)
        mv = memoryview(buf)
        for group in _groups(self._view.dirty()):
            self._view.read_many(mv, group)
            pos = 0
            for off, n in group:
                self.read_bytes += n
                part = mv[pos:pos + n]
                yield ZeroChange(off, n) if _ZERO.startswith(part) else DataChange(off, part)
                pos += n
            yield CHUNK_DONE


def _groups(extents: Iterator[tuple[int, int]]) -> Iterator[list[tuple[int, int]]]:
    """Dirty extents in groups of at most CHUNK bytes in all (an extent longer than that is
    cut): one buffer's worth of reads at a time."""
    group: list[tuple[int, int]] = []
    size = 0
    for off, length in extents:
        end = off + length
        while off < end:
            n = min(end - off, CHUNK - size)
            group.append((off, n))
            size += n
            off += n
            if size == CHUNK:
                yield group
                group, size = [], 0
    if group:
        yield group


class QemuCycle:
    method = "qemu"

    def __init__(self, tracker: QemuTracker, plan: CyclePlan, nodes: list[BlockNode], old_sizes: list[int] | None,
                 disks: QemuDisks, rest: AtRest | None):
        self.tracker, self.plan, self.nodes, self.old_sizes = tracker, plan, nodes, old_sizes
        self.disks = disks  # the VM's QEMU, or the private one of disks at rest
        self._rest = rest
        self.application_consistent = False
        self.warnings: list[str] = []
        self.scratch = tracker.baselines.begin(plan.seq)
        self._views: list[NbdView] = []
        self._fleece: list[Path] = []

    @property
    def whole(self) -> bool:
        return self.plan.initial or self.tracker.replica_maps is not None

    def start(self, i: int) -> int:
        resume = self.plan.resume
        if resume is None or i > resume[0]:
            return 0
        return resume[1] if i == resume[0] else 1 << 62

    def replica_map(self, i: int) -> DigestMapReader | None:
        maps = self.tracker.replica_maps
        if maps is None:
            return None
        r = DigestMapReader.open(maps[i])
        if r is None:
            raise QemuError("the replica's digest maps are damaged or do not match the disks")
        return r

    def capture(self) -> list[QemuView]:
        t, plan = self.tracker, self.plan
        try:
            for i, n in enumerate(self.nodes):
                f = t.fleece_dir / f"{t.prefix}{i}.qcow2"
                fleece.take(t.fleece_dir, t.prefix, i, n.size, f)  # made ahead by the last close
                self._fleece.append(f)
            counts = Qmp.run(self.disks.qmp, self._capture)
            for i in range(len(self.nodes)):
                self._views.append(NbdView(self.disks.nbd, f"{t.prefix}{i}",
                                           None if self.whole else bitmap(plan.base_seq)))
        except BaseException:
            self.close()
            raise
        return [QemuView(self, i, n, v, None if self.whole else counts[i])
                for i, (n, v) in enumerate(zip(self.nodes, self._views, strict=True))]

    async def _capture(self, q: Qmp) -> list[int]:
        t, plan = self.tracker, self.plan
        async def server() -> None:
            try:
                await q.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": self.disks.nbd}}})
            except QemuError as e:
                if "already running" not in str(e):
                    raise
        # independent: sent together, one round trip
        await asyncio.gather(server(), *(q.execute("blockdev-add", {
            "driver": "qcow2", "node-name": f"{t.prefix}{i}", "backing": n.node, "discard": "unmap",
            "file": {"driver": "file", "node-name": f"{t.prefix}f{i}", "filename": str(self._fleece[i])}})
            for i, n in enumerate(self.nodes)))
        actions: list[dict[str, Any]] = []
        for i, n in enumerate(self.nodes):
            persistent = n.format == "qcow2"
            if self.whole:  # a new chain of bitmaps: whatever an earlier relationship left goes
                actions += removals([n])
            else:
                actions.append({"type": "block-dirty-bitmap-disable",
                                "data": {"node": n.node, "name": bitmap(plan.base_seq)}})
            actions.append({"type": "block-dirty-bitmap-add", "data": {
                "node": n.node, "name": bitmap(plan.seq), "persistent": persistent, "granularity": GRANULARITY}})
            actions.append({"type": "blockdev-backup", "data": {
                "job-id": f"{t.prefix}job{i}", "device": n.node, "target": f"{t.prefix}{i}", "sync": "none",
                "auto-dismiss": True}})
        agent = GuestAgent(self.disks.agent) if self.disks.agent and self._rest is None else None
        frozen = False
        if agent is not None:  # held frozen for the transaction only
            try:
                frozen = await asyncio.to_thread(agent.freeze) >= 0
            except GuestAgentError as e:
                self.warnings.append(f"{e}; this point is crash-consistent")
        try:
            await q.execute("transaction", {"actions": actions})
        finally:
            if agent is not None and frozen:
                try:
                    await asyncio.to_thread(agent.thaw)
                except GuestAgentError as e:
                    self.warnings.append(f"{e}; check that the guest is not left frozen")
        self.application_consistent = frozen
        exports = []
        for i, n in enumerate(self.nodes):
            args: dict[str, Any] = {"type": "nbd", "id": f"{t.prefix}{i}", "node-name": f"{t.prefix}{i}",
                                    "name": f"{t.prefix}{i}", "writable": False}
            if not self.whole:
                args["bitmaps"] = [{"node": n.node, "name": bitmap(plan.base_seq)}]
            exports.append(q.execute("block-export-add", args))
        await asyncio.gather(*exports)
        if self.whole:
            return [0] * len(self.nodes)  # read whole: no bitmap counted
        # a recording bitmap only grows: one already dirty at ``begin`` is dirty now, and
        # only whether a disk has changes matters (QemuView.unchanged); else ask again
        counts = [int((n.bitmap(bitmap(plan.base_seq)) or {}).get("count", 0)) for n in self.nodes]
        if all(counts):
            return counts
        return [int((n.bitmap(bitmap(plan.base_seq)) or {}).get("count", 0))
                for n in resolve(await q.nodes(), self.disks)]

    def seal(self) -> None:
        for p in self.scratch.glob("full*.map"):
            p.unlink()
        (self.scratch / "qemu.json").write_text(json.dumps({"sizes": [v.size for v in self._views]}))
        self.tracker.baselines.seal(self.plan.seq)

    def commit(self) -> None:
        """The baseline moves to this cycle, and the baseline's bitmap, stopped by the
        capture, is dropped (by the names ``begin`` found: no question to QEMU first). That
        drop is tidying only (the next ``begin`` drops every bitmap older than its
        baseline): it is skipped when QEMU is not running (disks at rest: their private
        daemon quit when the cycle closed) or refuses it (the node is gone or renamed)."""
        seq = self.plan.seq
        self.tracker.baselines.keep_only(seq)
        fleece.Closing.wait(self.disks.qmp)  # what it raised: exports or nodes may linger until the next begin
        if self.whole:  # the capture's transaction dropped every older bitmap
            return
        drops = [{"type": "block-dirty-bitmap-remove", "data": {"node": n.node, "name": bitmap(self.plan.base_seq)}}
                 for n in self.nodes]

        async def drop(q: Qmp) -> None:
            await q.execute("transaction", {"actions": drops})

        try:
            Qmp.run(self.tracker.disks.qmp, drop)
        except QemuError as e:
            if not (e.gone or e.qmp_class):
                raise

    def abandon(self) -> None:
        """Nothing here: the next ``begin`` merges this cycle's bitmap back into the baseline's
        (a late finalizer must not touch what a later cycle set up)."""

    def close(self) -> None:
        for v in self._views:
            v.close()
        self._views = []
        try:
            if self._rest is None:
                Qmp.run(self.disks.qmp, lambda q: cleanup(q, self.tracker.prefix))
        finally:
            for f in self._fleece:
                f.unlink(missing_ok=True)
            self._fleece = []
            if self._rest is not None:  # its exit stores the bitmaps in the images
                self._rest.stop()
                self._rest = None

    def close_later(self) -> None:
        """The log's trailer is out: ``close`` in the background while the replica acknowledges,
        then the next capture's fleecing images made ahead (tracking/fleece.py). Disks at
        rest close at once (their private QEMU exits)."""
        if self._rest is not None:
            self.close()
            return
        t, sizes = self.tracker, [v.size for v in self._views]

        def close_and_prepare() -> None:
            self.close()
            fleece.prepare(t.fleece_dir, t.prefix, sizes)
        fleece.Closing.start(self.disks.qmp, close_and_prepare)


class QemuTracker:
    """The ``qemu`` tracker of one VM. ``replica_maps``: a resync, read whole against the
    replica's digests of its copy."""

    def __init__(self, baselines: Baselines, vm_id: str, disks: QemuDisks, fleece_dir: Path, *,
                 replica_maps: list[Path] | None = None):
        self.baselines, self.disks, self.fleece_dir = baselines, disks, fleece_dir
        self.replica_maps = replica_maps
        self.prefix = object_prefix(vm_id)

    def begin(self, plan: CyclePlan, disks: Sequence[Path]) -> QemuCycle:
        whole = plan.initial or self.replica_maps is not None
        if not whole:
            meta = self.baselines.dir(plan.base_seq) / "qemu.json"
            try:
                old_sizes = json.loads(meta.read_text())["sizes"]
            except (OSError, ValueError, KeyError):
                raise ResyncRequired(f"the QEMU tracking state of acknowledged cycle {plan.base_seq} is missing",
                                     hint="run `replicad replication resync`") from None
        else:
            old_sizes = None
        where, rest = self.disks, None
        fleece.Closing.wait(where.qmp, quiet=True)  # the last cycle's close, if it still runs
        try:
            nodes = Qmp.run(where.qmp, lambda q: self._begin(q, self.disks, plan, whole))
        except QemuError as e:
            if not e.gone:
                raise
            rest = AtRest(self.disks)  # the VM's QEMU is not running: its disks are at rest
            where = rest.disks
            try:
                nodes = Qmp.run(where.qmp, lambda q: self._begin(q, where, plan, whole))
            except BaseException:
                rest.stop()
                raise
        return QemuCycle(self, plan, nodes, old_sizes, where, rest)

    async def _begin(self, q: Qmp, disks: QemuDisks, plan: CyclePlan, whole: bool) -> list[BlockNode]:
        _, now = await tidy(q, self.prefix)  # what a replicad killed mid-cycle left; the nodes after it
        for f in self.fleece_dir.glob(f"{self.prefix}*.qcow2") if self.fleece_dir.exists() else ():
            if not fleece.is_prepared(f):  # a capture's image, left by a replicad killed mid-cycle
                os.unlink(f)
        nodes = resolve(now, disks)
        for n in nodes:
            if n.read_only:
                raise QemuError(f"disk {n.path} (node {n.node}) is read-only in QEMU: nothing to replicate")
        if whole:
            return nodes
        base = bitmap(plan.base_seq)
        actions: list[dict[str, Any]] = []
        for n in nodes:
            b = n.bitmap(base)
            if b is None or b.get("inconsistent"):
                why = "is inconsistent (QEMU stopped without saving it)" if b else \
                    "is gone (QEMU restarted, the VM moved, or it was removed)"
                await remove_bitmaps(q, nodes)
                raise ResyncRequired(f"the dirty bitmap {base} of disk {n.path} {why}: the next cycle is a resync",
                                     hint="run `replicad replication resync`")
            for other in n.bitmaps:
                s = bitmap_seq(other["name"])
                if s is None or s == plan.base_seq:
                    continue
                if s > plan.base_seq:  # a cycle not acknowledged: its writes belong to the baseline's
                    actions.append({"type": "block-dirty-bitmap-merge",
                                    "data": {"node": n.node, "target": base, "bitmaps": [other["name"]]}})
                actions.append({"type": "block-dirty-bitmap-remove", "data": {"node": n.node, "name": other["name"]}})
            if not b.get("recording"):
                actions.append({"type": "block-dirty-bitmap-enable", "data": {"node": n.node, "name": base}})
        if actions:
            await q.execute("transaction", {"actions": actions})
        return nodes

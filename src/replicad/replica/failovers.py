"""Failover on the replica server (SPEC §3.5, issue 14): start, move between points, stop,
complete and test failover, one at a time per VM, and their recovery at daemon start.

What it promises:
- every listed recovery point gives its own bytes until `complete`: the replica copy and
  its undo chain are never rolled back in place (replica/failover_copy.py);
- `failover start` fences the VM first (replica/fence.py): nothing is acknowledged after
  it begins; what was acknowledged is applied before the point is chosen (and listed), or
  discarded when it cannot be applied;
- while failed over (not completed) `failover start --recovery-point N` moves to N, older
  or newer, the VM off; `failover stop` returns to the newest point and to the state before
  the failover (a suspended replica stays suspended); `complete` alone drops the points and
  the copy is then what it reports;
- a crash at any moment leaves the catalog's state, and `recover` makes the files agree.
State changes are catalog writes made on the event loop (each awaited until durable, its
fsync on the catalog's writer thread); copies and roll-backs run in the APPLY
pool (workers.py): they are apply work, under the VM's apply lock."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from .. import log as logmod
from .. import workers
from ..catalog import Catalog
from ..errors import Conflict, ReplicadError, StorageError, UsageError
from ..images import disk_format
from ..model import VM, Disk, Relationship, ReplicationMode, VMState, split_files
from ..model import ReplicationState as S
from ..replication_states import (
    FAILOVER_STATES,
    FailoverCompleted,
    FailoverStarted,
    FailoverStopped,
    require,
    transition,
)
from . import disk_set, points, segments
from . import failover_copy as fc
from .failover import TEST_SUFFIX, make_test_copy
from .layout import VMDir
from .service import ReplicaService

log = logmod.get("replicad.failover")
DRAIN_TIMEOUT = 600.0  # a failover waits this long for acknowledged logs to be applied
TEST_HOOKS = ("on_start", "on_stop", "on_test_failover")  # what `VM - Test` inherits from its replica VM


def test_vm_name(vm: VM) -> str:
    return vm.name + TEST_SUFFIX


class Failovers:
    def __init__(self, catalog: Catalog, replica: ReplicaService, fault: Callable[[str], None] = lambda at: None):
        self.catalog = catalog
        self.replica = replica
        self._fault = fault
        self._locks: dict[str, asyncio.Lock] = {}

    def lock(self, vm_id: str) -> asyncio.Lock:
        """One failover operation at a time per VM (start, move, stop, complete, test, reverse)."""
        return self._locks.setdefault(vm_id, asyncio.Lock())

    # recovery at start ----------------------------------------------------------------------
    async def recover(self) -> None:
        """Before any apply runs: make every VM's files agree with its catalog state (a
        failover step cut by a crash is finished or undone), and drop test copies that no
        test VM names (a test failover started or stopped half-way)."""
        for rel in self.catalog.relationships():
            vm = self.catalog.vm_by_id(rel.vm_id)
            if vm is None or rel.source_vm:
                continue  # an extended relationship's files are a replica VM's: settled with it
            waiting = rel.role == "replica" and rel.state == S.FAILED_OVER_WAITING
            state = fc.WAITING if waiting else fc.NOT_FAILED_OVER if rel.role == "replica" and \
                rel.state != S.FAILED_OVER else fc.COMPLETED
            newest = newest_files(vm, rel)
            stale = [Path(p) for p in rel.failover.get("stale", [])] if waiting else []
            done = await workers.APPLY.run(fc.settle, vm.files(), state, rel.failover.get("disks"),
                                           lambda at: None, newest, stale)
            if rel.role == "replica" and rel.state == S.FAILED_OVER and rel.storage:
                await workers.APPLY.run(drop_points, vm.files(), VMDir.of(rel.storage, vm.id), newest)
            for what in done:
                log.warning("failover.recovered", vm=vm.name, state=rel.state.value, action=what,
                            reason="a failover step was cut by a crash; the files now agree with the catalog")
            if rel.role == "replica" and rel.storage:
                test_dir = VMDir.of(rel.storage, vm.id).root / "test"
                if test_dir.exists() and self.catalog.vm_by_name(test_vm_name(vm)) is None:
                    await asyncio.to_thread(shutil.rmtree, test_dir, True)
                    log.warning("failover.recovered", vm=vm.name, action="test copy deleted",
                                reason="no test VM names it (a test failover was cut by a crash)")

    # helpers --------------------------------------------------------------------------------
    def _fresh(self, vm: VM) -> Relationship:
        """The VM's replica relationship as it is now (under the VM's failover lock)."""
        rel = self.catalog.relationship(vm.id)
        if rel is None or rel.role != "replica":
            raise Conflict(f"failover starts on the replica server; {vm.name} is not a replica here",
                           hint="on the primary, `failover start --prepare` prepares a planned failover")
        return rel

    @staticmethod
    def _point(rel: Relationship, point) -> dict:
        """The recovery point to use: the newest by default, or one that is listed."""
        have = points.available(rel)
        if not have:
            why = (rel.error or "the copy is being resynchronized after a reverse") if rel.copy_unverified else ""
            raise Conflict("no recovery point is available" + (f" ({why})" if why else ""))
        if point is None:
            return have[-1]
        for p in have:
            if str(point) == str(p["seq"]):
                return p
        raise UsageError(f"recovery point {point} is not available; listed points: "
                         f"{', '.join(str(p['seq']) for p in have)}", hint="see `replicad replication recovery-points`")

    async def _make(self, vm: VM, files: list[Path], waiting: bool, vmdir: VMDir, rel: Relationship,
                    target: dict) -> tuple[str, list, list[Path]]:
        """The failover copy of ``target`` (failover_copy.make) from the replica copy's
        ``files``; nothing is left of it on failure."""
        try:
            chain = points.chain(vmdir, rel, target["seq"])
        except FileNotFoundError as e:
            raise Conflict(f"recovery point {target['seq']} of {vm.name} cannot be rebuilt: {e}") from None
        try:
            known = {p.name: p for p in [*vm.files(), *files]}  # a reversed VM's files are where they were
            return await workers.APPLY.run(fc.make, files, waiting, chain,
                                           lambda name: known.get(name) or disk_set.new_path(vmdir.disks, name),
                                           self._fault)
        except OSError as e:
            await workers.APPLY.run(fc.settle, vm.files() if waiting else files,
                                    fc.WAITING if waiting else fc.NOT_FAILED_OVER,
                                    rel.failover.get("disks") if waiting else None, lambda at: None, files)
            raise StorageError(f"cannot make the failover copy of {vm.name} at point {target['seq']}: "
                               f"{e.strerror or e}", hint="a reflink filesystem (XFS, btrfs) needs almost no space "
                               "for it; elsewhere it needs the disks' allocated size") from None

    async def _wait_applies(self, vm: VM) -> None:
        """Inside the fence: until what was acknowledged is applied, or an apply failed."""
        try:
            async with asyncio.timeout(DRAIN_TIMEOUT):
                await self.replica.drained(vm.id, or_failed=True)
        except TimeoutError:
            raise ReplicadError(f"acknowledged logs of {vm.name} are still being applied; try again") from None

    async def _discard_unapplied(self, vm: VM) -> str | None:
        """Under the apply lock: a log acknowledged but not applied (its apply failed) is
        discarded, never applied after the point is chosen. Returns what was discarded."""
        rel = self._fresh(vm)
        if staged := await asyncio.to_thread(segments.discard, VMDir.of(rel.storage, vm.id)):  # never applied
            log.warning("resync.segments_discarded", vm=vm.name, segments=staged, reason="the copy fails over at "
                        "its point; a resync staged in segments here starts over if replication comes back")
        if rel.applied_seq >= rel.seq:
            return None
        note = (f"logs {rel.applied_seq + 1}-{rel.seq} were acknowledged but could not be applied "
                f"({rel.error}); discarded")
        vmdir = VMDir.of(rel.storage, vm.id)
        await asyncio.to_thread(_drop_logs_above, vmdir, rel.applied_seq)
        rel.seq = rel.applied_seq
        rel.prepared_seq = rel.prepared_seq if rel.prepared_seq <= rel.applied_seq else 0
        rel.error = None
        await self.catalog.put_relationship(rel)
        log.warning("failover.discarded", vm=vm.name, reason=note)
        return note

    # failover -------------------------------------------------------------------------------
    async def start(self, vm: VM, point, actor: str) -> Relationship:
        """Fail over to ``point`` (the newest by default); while failed over, move to it."""
        async with self.lock(vm.id):
            vm = self.catalog.vm_by_id(vm.id) or vm  # its run state as it is now, under the lock
            rel = self._fresh(vm)
            if rel.state == S.FAILED_OVER_WAITING:
                return await self._move(vm, rel, point, actor)
            require(rel, FailoverStarted(vm.name, {}))
            if rel.applied_seq == 0:
                raise Conflict(f"{vm.name} has no complete copy here yet (initial replication not applied)")
            async with self.replica.fence.fenced(vm.id, self.replica.receive_lock(vm.id)):
                await self._wait_applies(vm)
                async with self.replica.apply_lock(vm.id):
                    discarded = await self._discard_unapplied(vm)
                    rel = self._fresh(vm)
                    target = self._point(rel, point)
                    files, vmdir = vm.files(), VMDir.of(rel.storage, vm.id)
                    how, made, at_point = await self._make(vm, files, False, vmdir, rel, target)
                    planned = 0 < rel.prepared_seq == rel.applied_seq == target["seq"]
                    record = {"point": target["seq"], "time": target["time"], "consistency": target["consistency"],
                              "planned": planned, "disks": made, "copy": how}
                    newest = list(vm.disks)
                    if at_point != files:  # the point has other disks: the VM is the point's while failed over
                        record["newest"] = [dataclasses.asdict(d) for d in newest]
                        vm.disks = await workers.APPLY.run(point_disks, vm, at_point)
                    rel = transition(rel, FailoverStarted(vm.name, record))
                    await self.catalog.put_vm_and_relationship(vm, rel)  # one transaction: state and disk set
                    self._fault("failover-committed")
                    await workers.APPLY.run(fc.settle, at_point, fc.WAITING, made, self._fault, files)
        kind = "planned" if planned else "unplanned"
        await self.catalog.audit(actor, "failover.started", f"{vm.name} to point {target['seq']} ({kind}, {how})")
        log.warning("failover.started", vm=vm.name, point=target["seq"], latest=rel.applied_seq, planned=planned,
                    copy=how, discarded=discarded,
                    reason="the operator failed over; the VM runs on its own copy of the point and every listed "
                    "point is kept until `failover complete`")
        return rel

    async def _move(self, vm: VM, rel: Relationship, point, actor: str) -> Relationship:
        if vm.state == VMState.RUNNING:
            raise Conflict(f"{vm.name} is running here; stop it before moving to another recovery point",
                           hint="what the failed-over VM wrote is dropped by the move")
        target = self._point(rel, point)
        before, vmdir = vm.files(), VMDir.of(rel.storage, vm.id)
        files = newest_files(vm, rel) or before
        async with self.replica.apply_lock(vm.id):
            how, made, at_point = await self._make(vm, files, True, vmdir, rel, target)
            planned = 0 < rel.prepared_seq == rel.applied_seq == target["seq"]
            # the files of the point left (``stale``) are recorded with the move: a crash before the
            # settle below has deleted them leaves the start's settle to finish it
            rel.failover.update(point=target["seq"], time=target["time"], consistency=target["consistency"],
                                planned=planned, disks=made, copy=how, stale=[str(p) for p in before])
            newest = [Disk(**d) for d in rel.failover.get("newest", [dataclasses.asdict(d) for d in vm.disks])]
            rel.failover.pop("newest", None)
            vm.disks = newest
            if at_point != files:
                rel.failover["newest"] = [dataclasses.asdict(d) for d in newest]
                vm.disks = await workers.APPLY.run(point_disks, vm, at_point)
            await self.catalog.put_vm_and_relationship(vm, rel)
            self._fault("failover-committed")
            await workers.APPLY.run(fc.settle, at_point, fc.WAITING, made, self._fault, files, before)
        await self.catalog.audit(actor, "failover.moved", f"{vm.name} to point {target['seq']} ({how})")
        log.warning("failover.moved", vm=vm.name, point=target["seq"], copy=how,
                    reason="the operator chose another recovery point; the failed-over VM's writes were dropped")
        return rel

    async def stop(self, vm: VM, actor: str) -> dict | Relationship:
        """End the test failover if there is one, else cancel the failover: back to the newest
        point and to the state before it. Returns what the API answers."""
        async with self.lock(vm.id):
            vm = self.catalog.vm_by_id(vm.id) or vm  # its run state as it is now, under the lock
            test = self.catalog.vm_by_name(test_vm_name(vm))
            rel = self._fresh(vm)
            if test is not None:
                await self.catalog.remove_vm(test.id)  # the row first: a crash leaves a copy that recovery drops
                self._fault("test-stopping")
                await asyncio.to_thread(shutil.rmtree, VMDir.of(rel.storage, vm.id).root / "test", True)
                await self.catalog.audit(actor, "failover.test_stopped", test.name)
                log.info("failover.test_stopped", vm=vm.name, reason="test VM and its copy deleted")
                return {"removed": test.name}
            require(rel, FailoverStopped(vm.name))
            if vm.state == VMState.RUNNING:
                raise Conflict(f"{vm.name} is running here; stop it before cancelling the failover")
            at_point, newest = vm.files(), newest_files(vm, rel)
            if "newest" in rel.failover:  # the replica copy's disks again
                vm.disks = [Disk(**d) for d in rel.failover["newest"]]
            rel = transition(rel, FailoverStopped(vm.name))  # back to the state before the failover
            await self.catalog.put_vm_and_relationship(vm, rel)
            self._fault("failover-stopping")
            await workers.APPLY.run(fc.settle, at_point, fc.NOT_FAILED_OVER, None, lambda at: None, newest)
        await self.catalog.audit(actor, "failover.cancelled", vm.name)
        log.info("failover.cancelled", vm=vm.name, state=rel.state.value,
                 reason="back to the newest point; what the failed-over VM wrote is dropped")
        return rel

    async def complete(self, vm: VM, actor: str) -> Relationship:
        """Commit the failover: the failover copy is the VM's; every other point is dropped."""
        async with self.lock(vm.id):
            vm = self.catalog.vm_by_id(vm.id) or vm  # its run state as it is now, under the lock
            rel = transition(self._fresh(vm), FailoverCompleted(vm.name))  # the copy is the point's
            await self.catalog.put_relationship(rel)
            self._fault("failover-completing")
            await workers.APPLY.run(drop_points, vm.files(), VMDir.of(rel.storage, vm.id), newest_files(vm, rel))
        await self.catalog.audit(actor, "failover.completed", f"{vm.name} at point {rel.applied_seq}")
        log.warning("failover.completed", vm=vm.name, point=rel.applied_seq,
                    reason="failover committed; the VM keeps the copy of this point, the other points are dropped")
        return rel

    # test failover --------------------------------------------------------------------------
    async def test_start(self, vm: VM, point, actor: str) -> tuple[VM, dict]:
        """A test VM on its own copy of ``point``; it inherits the replica VM's start, stop
        and test failover hooks. Returns it and the point."""
        async with self.lock(vm.id):
            vm = self.catalog.vm_by_id(vm.id) or vm  # its run state as it is now, under the lock
            rel = self._fresh(vm)
            if self.catalog.vm_by_name(test_vm_name(vm)) is not None:
                raise Conflict(f"a test failover of {vm.name} is already running",
                               hint=f"`replicad failover stop {vm.name}`")
            if rel.state not in FAILOVER_STATES + (S.FAILED_OVER_WAITING,):
                raise Conflict(f"{vm.name} has no recovery point to test in state {rel.state.value}")
            async with self.replica.apply_lock(vm.id):  # the replica copy at a committed point
                rel = self._fresh(vm)
                target = self._point(rel, point)
                vmdir = VMDir.of(rel.storage, vm.id)
                files = newest_files(vm, rel) or vm.files()  # the replica copy's
                src = fc.sources(files, rel.state == S.FAILED_OVER_WAITING)
                try:
                    chain = points.chain(vmdir, rel, target["seq"])
                except FileNotFoundError as e:
                    raise Conflict(f"recovery point {target['seq']} of {vm.name} cannot be rebuilt: {e}") from None

                def copy_at_point() -> tuple[list[Path], list[Disk], str]:
                    test_dir = vmdir.root / "test"
                    copies, how = make_test_copy(files, test_dir, src)
                    made = points.roll_back(chain, {p.name: c for p, c in zip(files, copies, strict=True)},
                                            lambda name: disk_set.new_path(test_dir, name))
                    at_point = list(made.values())
                    return at_point, point_disks(vm, at_point, lambda p: p), how
                copies, disks, how = await workers.APPLY.run(copy_at_point)
            _, settings = split_files(copies, bool(vm.config_file), vm.network_roles())
            test = VM(id=str(uuid.uuid4()), name=test_vm_name(vm), mode=ReplicationMode.TEST_REPLICA,
                      state=VMState.OFF, disks=disks,
                      hooks={k: v for k, v in vm.hooks.items() if k in TEST_HOOKS},
                      hook_timeout=vm.hook_timeout).with_settings(settings)
            await self.catalog.put_vm(test)
        await self.catalog.audit(actor, "failover.test_started", f"{test.name} at point {target['seq']} ({how})")
        log.info("failover.test_started", vm=vm.name, test_vm=test.name, point=target["seq"], copy=how,
                 reason="replication goes on into the replica; the test VM runs on its own copy")
        return test, target

    def listing(self, vm: VM, rel: Relationship) -> list[dict]:
        """`recovery-points`: each listed point with its undo size (blocking: a thread)."""
        vmdir = VMDir.of(rel.storage, vm.id)
        return [{"id": str(p["seq"]), "time": p["time"], "consistency": p["consistency"],
                 "size": points.undo_bytes(vmdir, rel, p["seq"]), "pinned": p["seq"] in rel.pinned}
                for p in points.available(rel)]


def newest_files(vm: VM, rel: Relationship) -> list[Path] | None:
    """While failed over to a point with other disks than the newest: the replica copy's files."""
    newest = rel.failover.get("newest") if rel.role == "replica" else None
    return None if newest is None else [Path(d["path"]) for d in newest] + [Path(p) for _, p in vm.settings()]


def point_disks(vm: VM, at_point: list[Path], where: Callable[[Path], Path] = fc.upcoming) -> list[Disk]:
    """The disks of a point's files (``where``: where each one's copy is now), as the VM lists them."""
    disks, _ = split_files(at_point, bool(vm.config_file), vm.network_roles())
    return [Disk(str(p), os.stat(where(p)).st_size, disk_format(where(p))) for p in disks]


def drop_points(files: list[Path], vmdir: VMDir, newest: list[Path] | None = None) -> None:
    """The file half of `complete` (after the catalog's): the replica copy set aside, the undo
    chain and any staged log are deleted. Idempotent (`recover` redoes it after a crash)."""
    fc.settle(files, fc.COMPLETED, newest=newest)
    for folder in (vmdir.undo, vmdir.logs):
        if folder.exists():
            for p in folder.iterdir():
                p.unlink(missing_ok=True)


def _drop_logs_above(vmdir: VMDir, seq: int) -> None:
    if vmdir.logs.exists():
        for p in vmdir.logs.iterdir():
            if not p.name[:12].isdigit() or int(p.name[:12]) > seq:
                p.unlink(missing_ok=True)

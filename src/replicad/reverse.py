"""`replication reverse` (Set-VMReplication -Reverse), both halves.

New primary (the old replica, failed over): the common point is the one it failed over to.
Nothing else is assumed: when its own disks moved since the failover (identities recorded
when the failover copy was made; a running VM counts as moving), or the old primary's
moved since it prepared, or the failover was unplanned, the first cycle is a resync — the
old primary's block digests against these disks, only differing blocks shipped — so
everything the new primary holds beyond the common point reaches the old one (issue 14.3,
14.4). Otherwise its disks are that point's bytes: it digests them as the common point's
baseline (a local read) and the first cycle is a delta. Reverse completes the failover:
the other recovery points are dropped.

Old primary: it accepts only what its own operator made possible (issue 13.1):
- planned: it prepared exactly that epoch and sequence (PreparedForFailover); its disks are
  then compared with the identities recorded when the prepare was acknowledged, and a
  resync is asked for when they moved;
- unplanned: the VM is known to be off here (`vm stop`; a VM whose state is Unknown is
  treated as running) and this host heard from its replica server, in an authenticated
  answer, that the copy failed over (a cycle refused with `failedover`, or its status).
Its disk files stay where they are and become the replica copies."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
from pathlib import Path

from . import log as logmod
from . import workers
from .errors import Conflict, Refused, UsageError
from .host import Host
from .model import VM, Disk, Relationship, ReplicationMode, Stats, VMState
from .model import ReplicationState as S
from .replica.failover import TEST_SUFFIX
from .replica.failovers import drop_points
from .replica.layout import VMDir
from .replication_states import reversed_state
from .split_brain import primary_port
from .times import utcnow
from .tracking.baselines import Baselines, build_baseline
from .tracking.digestmap import identities
from .tracking.qemu import alive as qemu_alive
from .tracking.qemu import vm_state

log = logmod.get("replicad.reverse")


async def start(host: Host, vm_name: str, actor: str) -> tuple:
    vm = host.catalog.vm_by_name(vm_name)
    if vm is None or host.catalog.relationship(vm.id) is None:
        raise UsageError(f"no replicated VM named {vm_name!r} here")
    vm_id = vm.id
    async with host.failovers.lock(vm_id):
        vm, rel = host.catalog.vm_by_name(vm_name), host.catalog.relationship(vm_id)
        if vm is None or rel is None:  # removed while this waited for the lock
            raise UsageError(f"no replicated VM named {vm_name!r} here")
        if rel.role != "replica" or rel.state not in (S.FAILED_OVER_WAITING, S.FAILED_OVER):
            raise Conflict(f"{vm_name} must be failed over on this host before reversing (state {rel.state.value})",
                           hint="`replicad failover start` here first")
        if host.catalog.vm_by_name(vm.name + TEST_SUFFIX) is not None:
            raise Conflict(f"a test failover of {vm_name} is running here",
                           hint=f"`replicad failover stop {vm_name}` first")
        point = int(rel.failover["point"])
        disks = vm.files()
        moved = await vm_state(vm) == VMState.RUNNING or \
            await asyncio.to_thread(identities, disks) != rel.failover.get("disks")
        resync = moved or not rel.failover.get("planned")
        epoch = secrets.token_hex(8)
        if not resync:  # the copy is the common point's bytes: its digests are the baseline
            await workers.DIGESTS.run(build_baseline, host.config.state_dir, vm.id, point, disks)
            resync = await asyncio.to_thread(identities, disks) != rel.failover.get("disks")  # written meanwhile
        old_primary = rel.primary_server
        port = primary_port(rel)
        async with host.client.conversation(old_primary, port, rel.auth) as conv:
            answer = await conv.request("POST", f"/v1/replicas/{vm.id}/reverse",
                                        data=_json({"epoch": epoch, "seq": point, "old_epoch": rel.epoch,
                                                    "resync": resync}))
        seq = answer.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            raise Conflict(f"{old_primary} gave a malformed answer to the reverse")
        resync = resync or answer.get("resync") is not False
        await host.replica.stop_vm(vm.id)
        new = Relationship(vm_id=vm.id, role="primary", state=reversed_state(rel, resync),
                           primary_server=host.config.host, replica_server=old_primary, replica_port=port,
                           auth=rel.auth, frequency=rel.frequency or 300, recovery_history=rel.recovery_history,
                           recovery_point_interval=rel.recovery_point_interval, epoch=epoch,
                           seq=seq if resync else point, last_replication_time=utcnow(),
                           stats=Stats(monitoring_start=utcnow(), initial_replication_size=0))
        vm.mode = ReplicationMode.PRIMARY
        await host.catalog.put_vm_and_relationship(vm, new)
        await asyncio.to_thread(drop_points, disks, VMDir.of(rel.storage, vm.id))  # reverse completes the failover
    await host.catalog.audit(actor, "replication.reversed", f"{vm.name}: now primary, replicating to {old_primary}")
    if resync:
        log.warning("reverse.resync", vm=vm.name, old_primary=old_primary, point=point,
                    reason="a side moved since the common point (or the failover was unplanned): the first cycle "
                    "compares both copies block by block and ships every block that differs")
    kind = "planned" if rel.failover.get("planned") else "unplanned"
    log.info("replication.reversed", vm=vm.name, replica=old_primary, point=point, resync=resync,
             reason=f"{kind} failover completed by reverse; this host is the primary now")
    host.primary.ensure(vm.id)
    return vm, new


async def _qemu_copy_files(host: Host, vm: VM, principal: str) -> list[Disk]:
    """The files a reverse writes the copy into, for a VM run by QEMU here: each disk as the
    guest saw it, raw — a raw image itself, else a new ``<stem>.raw`` beside it (the resync
    that follows fills it; the image stays as it was). Refused while QEMU still runs."""
    if await qemu_alive(vm):
        log.warning("reverse.refused", vm=vm.name, peer=principal, reason="its QEMU process still runs here")
        raise Refused(f"{vm.name}'s QEMU process still runs on {host.config.host}: a reverse writes the copy into "
                      "its disks", hint="shut that QEMU process down, then reverse again")
    out = []
    for d in vm.disks:
        if d.format == "raw":
            out.append(Disk(d.path, d.size, "raw"))
            continue
        raw = Path(d.path).with_name(d.copy_name)
        if raw.exists():
            raise Refused(f"{raw} exists on {host.config.host}: the reverse would write {vm.name}'s raw copy there",
                          hint=f"move it away, then reverse again ({d.path} itself is left as it is)")
        out.append(Disk(str(raw), d.size, "raw"))
    return out


def _create_sparse(disks: list[Disk]) -> None:
    for d in disks:
        if not Path(d.path).exists():
            with open(d.path, "xb") as f:
                f.truncate(d.size)
                os.fsync(f.fileno())


def _json(doc: dict) -> bytes:
    return json.dumps(doc).encode()


async def accept(host: Host, principal: str, auth: str, vm_id: str, doc: dict) -> dict:
    """The old primary's half: become the replica of ``principal`` for this VM, when this
    host's own operator made it possible (see the module's doc); refused otherwise."""
    epoch, seq, old_epoch = doc.get("epoch"), doc.get("seq"), doc.get("old_epoch")
    if not (isinstance(epoch, str) and epoch.isalnum() and len(epoch) <= 64 and isinstance(seq, int)
            and not isinstance(seq, bool) and seq >= 0 and isinstance(old_epoch, str)
            and isinstance(doc.get("resync", False), bool)):
        raise UsageError("malformed reverse request")
    grant = host.replica.grant_for(principal, auth)  # this host's server settings decide
    vm = host.catalog.vm_by_id(vm_id)
    rel = host.catalog.relationship(vm_id)
    if vm is None or rel is None or rel.role != "primary" or rel.source_vm:
        raise Conflict("no VM with that id is a primary here")
    if rel.replica_server != principal:
        raise Refused(f"{principal} is not the replica server of {vm.name}")
    qemu_files = vm.qemu and await _qemu_copy_files(host, vm, principal)
    planned = rel.state == S.PREPARED_FOR_FAILOVER and rel.prepared.get("seq") == seq == rel.seq \
        and rel.epoch == old_epoch
    if planned:  # the new primary may ask for a resync too: its own disks moved since the failover
        moved = await asyncio.to_thread(identities, vm.files()) != rel.prepared.get("disks")
        resync = moved or doc.get("resync") is True or bool(qemu_files)
        if moved:
            log.warning("reverse.disks_moved", vm=vm.name, peer=principal,
                        reason="this host's disks changed since the prepare was acknowledged; the new primary "
                        "resynchronizes them")
    else:
        state = await vm_state(vm)
        if state != VMState.OFF:
            raise Conflict(f"{vm.name} is {'running' if state == VMState.RUNNING else 'in an unknown state'} on "
                           f"{host.config.host}; a reverse would overwrite its disks",
                           hint=f"if the failed-over copy is to win, `replicad vm stop {vm.name}` there first")
        if not rel.replica_failed_over:
            raise Conflict(f"{host.config.host} has not heard from {principal} that its copy of {vm.name} failed "
                           "over", hint=f"`replicad replication sync {vm.name}` on {host.config.host} asks it "
                           "(the cycle is refused with that answer), then reverse again")
        resync, seq = True, rel.seq
    await host.primary.forget(vm.id)
    await asyncio.to_thread(Baselines(host.config.state_dir, vm.id).drop_all)
    vmdir = VMDir.of(grant.storage, vm.id)
    await asyncio.to_thread(vmdir.create)  # staged and undo logs; the disks stay where they are
    new = Relationship(vm_id=vm.id, role="replica", state=reversed_state(rel, resync), primary_server=principal,
                       trust_group=grant.trust_group, storage=str(grant.storage), epoch=epoch, seq=seq,
                       applied_seq=seq, auth=auth, frequency=rel.frequency, last_replication_time=utcnow(),
                       last_point_time=rel.prepared.get("time") if planned else None, copy_unverified=resync,
                       stats=Stats(monitoring_start=utcnow()))
    vm.mode = ReplicationMode.REPLICA
    vm.state = VMState.OFF
    if qemu_files:  # from now on the VM's disks are the raw copies; QEMU is not replicad's here any more
        await asyncio.to_thread(_create_sparse, qemu_files)
        vm.disks, vm.qemu = qemu_files, {}
    await host.catalog.put_vm_and_relationship(vm, new)
    await host.catalog.audit(principal, "replication.reversed", f"{vm.name}: now replica of {principal}"
                             + (" (to be resynchronized)" if resync else ""))
    log.info("replication.reversed", vm=vm.name, primary=principal, point=seq, planned=planned, resync=resync,
             reason="the failed-over replica reversed replication; this host's disks are now the replica copies")
    host.replica.start_vm(vm.id)
    return {"vm_id": vm.id, "role": "replica", "seq": seq, "resync": resync}

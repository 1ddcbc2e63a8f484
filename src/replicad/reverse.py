"""`replication reverse` after a planned failover (Set-VMReplication -Reverse), both halves.

New primary (the old replica, failed over): builds the digest maps of its copy as the
baseline of the common point (a local read; nothing crosses the network), then asks the old
primary to become its replica, then takes the primary role with a new epoch.

Old primary (prepared for failover): the request is authorized by *its own* replica-server
settings and entries (it must accept its partner); the VM's disk files stay where they are
and become the replica copies; the next log it accepts is the first reverse delta, built on
the common point. No full copy in either direction."""

from __future__ import annotations

import asyncio
import json
import secrets

from . import log as logmod
from .api.context import Host
from .times import utcnow
from .errors import Conflict, Refused, UsageError
from .model import Relationship, ReplicationMode, ReplicationState as S, Stats, VMState
from .primary.baseline import Baselines
from .replica.failover import build_baseline
from .replica.layout import VMDir

log = logmod.get("replicad.reverse")


async def start(host: Host, vm_name: str, actor: str) -> tuple:
    vm = host.catalog.vm_by_name(vm_name)
    rel = host.catalog.relationship(vm.id) if vm else None
    if vm is None or rel is None:
        raise UsageError(f"no replicated VM named {vm_name!r} here")
    if rel.role != "replica" or rel.state not in (S.FAILED_OVER_WAITING, S.FAILED_OVER):
        raise Conflict(f"{vm_name} must be failed over on this host before reversing (state {rel.state.value})",
                       hint="`replicad failover start` here first")
    planned = bool(rel.failover.get("planned"))
    point = int(rel.failover["point"])
    disks = vm.files()
    old_primary = rel.primary_server
    port = rel.primary_ports[1 if rel.auth == "certificate" else 0] or (443 if rel.auth == "certificate" else 80)
    epoch = secrets.token_hex(8)
    if planned:
        await asyncio.to_thread(build_baseline, host.config.state_dir, vm.id, point, disks)
    async with host.client.conversation(old_primary, port, rel.auth) as conv:
        answer = await conv.request("POST", f"/v1/replicas/{vm.id}/reverse",
                                    data=_json({"epoch": epoch, "seq": point, "old_epoch": rel.epoch,
                                                "resync": not planned}))
    if not planned:  # the old primary may hold changes this copy never got: compare, then ship
        point = int(answer.get("seq", 0))
        log.warning("reverse.resync", vm=vm.name, old_primary=old_primary,
                    reason="unplanned failover: the first cycle compares both copies block by block; blocks the "
                    "old primary changed after the last replicated point are replaced, by the operator's reverse")
    await host.replica.stop_vm(vm.id)
    new = Relationship(vm_id=vm.id, role="primary", state=S.REPLICATING if planned else S.RESYNCHRONIZING,
                    primary_server=host.config.host,
                    replica_server=old_primary, replica_port=port, auth=rel.auth, frequency=rel.frequency or 300,
                    recovery_history=rel.recovery_history, recovery_point_interval=rel.recovery_point_interval,
                    epoch=epoch, seq=point, last_replication_time=utcnow(),
                    stats=Stats(monitoring_start=utcnow(), initial_replication_size=0))
    vm.mode = ReplicationMode.PRIMARY
    host.catalog.put_vm_and_relationship(vm, new)
    host.catalog.audit(actor, "replication.reversed", f"{vm.name}: now primary, replicating to {old_primary}")
    log.info("replication.reversed", vm=vm.name, replica=old_primary, point=point,
             reason="planned failover completed by reverse; the next cycle ships only what changed here" if planned
             else "unplanned failover completed by reverse; the first cycle compares both copies and ships what "
             "differs")
    host.primary.ensure(vm.id)
    return vm, new


def _json(doc: dict) -> bytes:
    return json.dumps(doc).encode()


async def accept(host: Host, principal: str, auth: str, vm_id: str, doc: dict) -> dict:
    """The old primary's half: become the replica of ``principal`` for this VM."""
    epoch, seq, old_epoch = doc.get("epoch"), doc.get("seq"), doc.get("old_epoch")
    resync = doc.get("resync") is True
    if not (isinstance(epoch, str) and epoch.isalnum() and len(epoch) <= 64 and isinstance(seq, int)
            and not isinstance(seq, bool) and seq >= 1 and isinstance(old_epoch, str)):
        raise UsageError("malformed reverse request")
    grant = host.replica.grant_for(principal, auth)  # this host's server settings decide
    vm = host.catalog.vm_by_id(vm_id)
    rel = host.catalog.relationship(vm_id)
    if vm is None or rel is None or rel.role != "primary":
        raise Conflict("no VM with that id is a primary here")
    if rel.replica_server != principal:
        raise Refused(f"{principal} is not the replica server of {vm.name}")
    if resync:
        if vm.state == VMState.RUNNING:
            raise Conflict(f"{vm.name} is still running on {host.config.host}; stop it before the failed-over "
                           "copy takes over", hint=f"`replicad vm stop {vm.name}` there")
        seq = rel.seq  # the point this copy last shipped; the resync finds what differs
    else:
        if rel.state != S.PREPARED_FOR_FAILOVER:
            raise Conflict(f"{vm.name} is not prepared for failover here (state {rel.state.value})",
                           hint=f"`replicad failover start {vm.name} --prepare` on this host first")
        if rel.seq != seq or rel.epoch != old_epoch:
            raise Conflict(f"the common point differs: here {rel.epoch}/{rel.seq}, replica {old_epoch}/{seq}")
    await host.primary.forget(vm.id)
    await asyncio.to_thread(Baselines(host.config.state_dir, vm.id).drop_all)
    vmdir = VMDir.of(grant.storage, vm.id)
    await asyncio.to_thread(vmdir.create)  # staged and undo logs; the disks stay where they are
    new = Relationship(vm_id=vm.id, role="replica", state=S.REPLICATING, primary_server=principal,
                    trust_group=grant.trust_group, storage=str(grant.storage), epoch=epoch, seq=seq,
                    applied_seq=seq, auth=auth, frequency=rel.frequency, last_replication_time=utcnow(),
                    stats=Stats(monitoring_start=utcnow()))
    vm.mode = ReplicationMode.REPLICA
    host.catalog.put_vm_and_relationship(vm, new)
    host.catalog.audit(principal, "replication.reversed", f"{vm.name}: now replica of {principal}")
    log.info("replication.reversed", vm=vm.name, primary=principal, point=seq,
             reason="the failed-over replica reversed replication; this host's disks are now the replica copies")
    host.replica.start_vm(vm.id)
    return {"vm_id": vm.id, "role": "replica", "seq": seq}

"""A primary prepared for a planned failover (SPEC §3.5, issue 14.4, 14.8): the final cycle
must be a consistent capture; while prepared, the primary asks its replica on each tick
whether the copy failed over (what an unplanned reverse needs it to have heard) or the
failover was cancelled there (then it replicates again). Used by primary/engine.py."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import log as logmod
from ..errors import ReplicadError
from ..model import Consistency, Relationship
from ..model import ReplicationState as S
from ..replication_states import PrepareCancelled, ReplicaFailedOver, transition
from ..times import utcnow

if TYPE_CHECKING:
    from .engine import PrimaryEngine

log = logmod.get("replicad.primary")
PREPARE_ATTEMPTS = 3  # a --prepare whose capture is fuzzy is tried again this many times in all


def prepared_record(rel: Relationship, seq: int, time: str, identities: list) -> dict:
    """What a planned reverse compares this host's disks with (reverse.py): the identities
    they had before the final cycle read them."""
    return {"epoch": rel.epoch, "seq": seq, "time": time, "disks": [[i.size, i.mtime_ns, i.ino] for i in identities]}


async def until_consistent(engine: PrimaryEngine, vm_id: str) -> dict:
    """Run the prepare cycle until its capture is consistent (PREPARE_ATTEMPTS at most);
    the outcome of the one that prepared, or ReplicadError with the reason."""
    for _ in range(PREPARE_ATTEMPTS):
        engine.prepare_next.add(vm_id)
        outcome = await engine.request_cycle(vm_id)
        if outcome.get("consistency") != Consistency.FUZZY.value:
            rel = engine.catalog.relationship(vm_id)
            if rel is not None and rel.state != S.PREPARED_FOR_FAILOVER:  # a verb taken while it ran wins
                raise ReplicadError(f"{engine.name_of(vm_id)} is not prepared: replication is {rel.state.value} "
                                    "(it changed while the final cycle ran)")
            return outcome
        log.warning("failover.prepare_fuzzy", vm=engine.name_of(vm_id), cycle=outcome.get("seq"),
                    reason="the disks changed while the final cycle read them; trying again")
    raise ReplicadError(f"{engine.name_of(vm_id)} is not prepared: its disks changed while they were read, "
                        f"{PREPARE_ATTEMPTS} times, although the VM is off (something still writes to them)",
                        hint="stop whatever writes to the disk files, then prepare again")


async def ask_replica(engine: PrimaryEngine, vm_id: str) -> None:
    """On each tick while prepared, ask the replica: it failed over (what an unplanned
    reverse needs to have heard), or it no longer holds the prepared point as prepared —
    the failover was cancelled there — and this primary replicates again. A fenced primary
    (FailedOverElsewhere, issue 19.4) asks too, on each tick and before a `sync`: when the
    copy is no longer failed over there (`failover stop`), it replicates again."""
    waiting = (S.PREPARED_FOR_FAILOVER, S.FAILED_OVER_ELSEWHERE)
    rel = engine.catalog.relationship(vm_id)
    if rel is None or rel.state not in waiting:
        return
    try:
        async with engine.client.conversation(rel.replica_server, rel.replica_port, rel.auth) as conv:
            st = await conv.replica_status(vm_id)
    except ReplicadError as e:
        log.info("failover.prepared_check_failed", vm=engine.name_of(vm_id), reason=str(e))
        return
    rel = engine.catalog.relationship(vm_id)
    if rel is None or rel.state not in waiting:
        return
    if st.get("state") in (S.FAILED_OVER_WAITING.value, S.FAILED_OVER.value):
        if not rel.replica_failed_over:
            await engine.save(transition(rel, ReplicaFailedOver(utcnow())))
        return
    if not (st.get("exists") and st.get("epoch") == rel.epoch):
        return
    if rel.state == S.FAILED_OVER_ELSEWHERE:
        await engine.save(transition(rel, PrepareCancelled()))
        log.warning("replication.unfenced", vm=engine.name_of(vm_id), peer=rel.replica_server,
                    reason="the replica's copy is no longer failed over (its failover was cancelled); replicating "
                    "again — the VM stays as it is until `vm start`")
        engine.kick(vm_id)
    elif st.get("prepared_seq") != rel.seq:
        rel = transition(rel, PrepareCancelled())
        await engine.save(rel)
        log.warning("failover.prepare_cancelled", vm=engine.name_of(vm_id), peer=rel.replica_server,
                    reason="the replica no longer holds the prepared point as prepared (its failover was "
                    "cancelled); replicating again — the VM stays off until `vm start`")


async def ask_if_fenced(engine: PrimaryEngine, rel: Relationship) -> Relationship:
    """Before a `sync` of a fenced primary (FailedOverElsewhere): ask its replica now, and
    return the relationship as that leaves it."""
    if rel.state != S.FAILED_OVER_ELSEWHERE:
        return rel
    await ask_replica(engine, rel.vm_id)
    return engine.catalog.require_relationship(rel.vm_id)

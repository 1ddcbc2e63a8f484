"""The primary's supervisor, as pure functions (the states themselves: replication_states.py).

- ``schedule``: whether the supervisor runs a cycle now, waits, or idles — a needed resync
  as `--auto-resync`, `--resync-window` and `resync --at` say (resync_policy.py).
- ``plan_cycle``: what that cycle is (initial copy, delta, resync; prepared or not).

No I/O and no clock: times come in as arguments."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import Enum

from . import resync_policy
from .errors import ReplicadError
from .model import Relationship
from .model import ReplicationState as S
from .replication_states import RUNNING_STATES, CycleKind
from .times import parse_time


class Step(Enum):
    RUN = "run"            # a cycle now
    WAIT = "wait"          # until ``until`` (the tick, the backoff, `--at`), or a wake
    IDLE = "idle"          # until a verb wakes it: not a running state, or a held resync
    PREPARED = "prepared"  # prepared for failover, or fenced (FailedOverElsewhere): ask the replica at each tick


@dataclass(frozen=True)
class Next:
    step: Step
    until: float | None = None             # WAIT, PREPARED: the monotonic deadline
    refusal: ReplicadError | None = None   # IDLE, PREPARED: what a requested cycle is told


def schedule(rel: Relationship, name: str, *, requested: bool, last_start: float | None, backoff: float,
             now: float, wall: datetime) -> Next:
    """The supervisor's next step for ``rel``. ``requested``: someone waits for a cycle
    (sync, start-initial, prepare); ``last_start``: when the previous cycle started
    (monotonic, None before the first); ``now``: monotonic; ``wall``: the time of day."""
    if rel.state == S.PREPARED_FOR_FAILOVER:
        return Next(Step.PREPARED, until=now + rel.frequency,
                    refusal=ReplicadError(f"{name} is prepared for failover",
                                          hint="`replicad replication resume` cancels the prepare"))
    if rel.state == S.FAILED_OVER_ELSEWHERE:  # fenced (issue 19.4): no cycle; is the copy still failed over?
        return Next(Step.PREPARED, until=now + rel.frequency,
                    refusal=ReplicadError(f"{name} failed over to {rel.replica_server}"))
    if rel.state not in RUNNING_STATES or (rel.state == S.WAITING_FOR_RESYNC and rel.resync_hold):
        return Next(Step.IDLE, refusal=ReplicadError(f"replication of this VM is {rel.state.value}"))
    if rel.state == S.WAITING_FOR_RESYNC and not requested:
        when = resync_policy.decide(rel, plan_cycle(rel).automatic, wall)
        if when.idle is not None:
            return Next(Step.IDLE, refusal=ReplicadError(f"{name} needs a resynchronization: {when.idle}"))
        if when.wait:
            return Next(Step.WAIT, until=now + when.wait)
    if rel.state == S.WAITING_FOR_INITIAL and not requested:
        due = (parse_time(rel.start_at) - wall).total_seconds() if rel.start_at else 0.0
        if due > 0:
            return Next(Step.WAIT, until=now + due)
    elif (rel.state in (S.REPLICATING, S.ERROR, S.WAITING_FOR_RESYNC, S.RESYNCHRONIZING) and not requested
          and last_start is not None):
        # a needed resync (e.g. after a resumed initial copy) does not wait a whole frequency
        wait = (rel.frequency if rel.error is None and rel.state != S.WAITING_FOR_RESYNC
                else min(backoff, rel.frequency))
        if now < last_start + wait:
            return Next(Step.WAIT, until=last_start + wait)
    return Next(Step.RUN)


@dataclass(frozen=True)
class CyclePlan:
    kind: CycleKind
    automatic: bool   # a resync the engine decided on (after a refusal), not the operator's (nor a seed's,
                      # nor an import's): one over a copy modified on the replica is held (primary/resync.py)


def plan_cycle(rel: Relationship) -> CyclePlan:
    """What a cycle of ``rel`` ships: an initial copy while nothing was acknowledged (and no
    seed or resync is asked for), a resync when one is needed or asked for (or a seed), a
    delta otherwise. (A `--prepare` cycle is any but an initial copy: the engine's.)"""
    resyncing = rel.state in (S.WAITING_FOR_RESYNC, S.RESYNCHRONIZING)
    initial = rel.seq == 0 and not rel.seed and not resyncing
    kind = (CycleKind.INITIAL if initial else CycleKind.RESYNC if rel.seed or resyncing else CycleKind.DELTA)
    automatic = kind == CycleKind.RESYNC and rel.state == S.WAITING_FOR_RESYNC and not rel.awaiting_import \
        and not rel.seed and not rel.resync_at  # `resync --at` is the operator's
    return CyclePlan(kind, automatic=automatic)

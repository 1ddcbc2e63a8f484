"""The replication states (SPEC §3.4's names) as data and pure functions.

- ``EDGES``: the documented diagram — every change of state a relationship may make, per
  role, each with its cause; ``ENTRY``: the states a relationship is created in.
- (``replication_schedule``: whether the primary's supervisor runs a cycle now, and what it is.)
- ``transition``: what an outcome, an error or an operator's verb does to a relationship:
  its state and the fields that go with it (``error``, the resync hold, the prepared
  record, what the replica said). Refusals of a verb in the wrong state are ``Conflict``s.

No I/O and no clock: times come in as arguments, and ``transition`` returns a new
Relationship (the one passed in is not changed). Every change of ``Relationship.state`` in
the daemon goes through ``transition`` (the primary's engine, the replica's applier and
failovers, the API's verbs through them); tests/unit/test_replication_states.py drives it
with random sequences of outcomes, errors and verbs and fails on any change of state that
``EDGES`` lacks (docs/design.md §5)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum

from .errors import Conflict, ErrorCode, ReplicadError, ResyncHeld
from .model import Relationship
from .model import ReplicationState as S

PRIMARY, REPLICA = "primary", "replica"

# --- the diagram --------------------------------------------------------------------------

ENTRY: dict[str, dict[S, str]] = {
    PRIMARY: {S.READY_FOR_INITIAL: "`replication enable`",
              S.REPLICATING: "`replication reverse` on a failed-over replica, nothing moved since the point",
              S.RESYNCHRONIZING: "`replication reverse`, a side moved or the failover was unplanned"},
    REPLICA: {S.INITIAL_IN_PROGRESS: "the first log of an initial copy, `import-initial`, or a seed",
              S.REPLICATING: "`replication reverse` reached the old primary: its disks are the copies"},
}

# The primary's supervisor runs cycles in these states (others wait for a verb).
RUNNING_STATES = frozenset({S.WAITING_FOR_INITIAL, S.INITIAL_IN_PROGRESS, S.REPLICATING, S.ERROR,
                            S.WAITING_FOR_RESYNC, S.RESYNCHRONIZING})

FENCEABLE = (S.REPLICATING, S.ERROR, S.WAITING_FOR_RESYNC, S.RESYNCHRONIZING)  # issue 19.4 (when seq > 0)

EDGES: dict[str, dict[tuple[S, S], str]] = {
    PRIMARY: {
        (S.READY_FOR_INITIAL, S.WAITING_FOR_INITIAL): "`start-initial --at`",
        (S.READY_FOR_INITIAL, S.INITIAL_IN_PROGRESS): "`start-initial`",
        (S.READY_FOR_INITIAL, S.WAITING_FOR_RESYNC): "`start-initial --use-existing`, or `--export` written",
        (S.READY_FOR_INITIAL, S.REPLICATING): "a cycle under way when `suspend` and `resume` came was "
                                              "acknowledged: `resume`'s state for an acknowledged copy",
        (S.WAITING_FOR_INITIAL, S.INITIAL_IN_PROGRESS): "`start-initial`, or the `--at` time came",
        (S.WAITING_FOR_INITIAL, S.WAITING_FOR_RESYNC): "`start-initial --use-existing`, or `--export` written",
        (S.WAITING_FOR_INITIAL, S.SUSPENDED): "`suspend`",
        (S.WAITING_FOR_INITIAL, S.REPLICATING): "a cycle under way when `start-initial --at` came was "
                                                "acknowledged: the initial replication is done",
        (S.INITIAL_IN_PROGRESS, S.REPLICATING): "the initial copy acknowledged",
        (S.INITIAL_IN_PROGRESS, S.WAITING_FOR_RESYNC): "a resumed initial copy acknowledged (a resync "
                                                       "follows), refused with `resync`, or `--export` written",
        (S.INITIAL_IN_PROGRESS, S.ERROR): "a permanent error",
        (S.INITIAL_IN_PROGRESS, S.SUSPENDED): "`suspend`",
        (S.REPLICATING, S.WAITING_FOR_RESYNC): "refused with `resync` (gap, fork, lost baseline, modified copy), "
                                               "or `resync --at`",
        (S.REPLICATING, S.RESYNCHRONIZING): "`replication resync`",
        (S.REPLICATING, S.ERROR): "a permanent error",
        (S.REPLICATING, S.SUSPENDED): "`suspend`",
        (S.REPLICATING, S.PREPARED_FOR_FAILOVER): "`failover start --prepare`: the final cycle acknowledged",
        (S.ERROR, S.WAITING_FOR_INITIAL): "`start-initial --at` (nothing acknowledged yet)",
        (S.ERROR, S.INITIAL_IN_PROGRESS): "`start-initial`, or the next attempt of an initial copy",
        (S.ERROR, S.REPLICATING): "the next cycle acknowledged",
        (S.ERROR, S.WAITING_FOR_RESYNC): "refused with `resync`, `--use-existing`, or `--export` written",
        (S.ERROR, S.RESYNCHRONIZING): "`replication resync`",
        (S.ERROR, S.SUSPENDED): "`suspend`",
        (S.ERROR, S.PREPARED_FOR_FAILOVER): "`failover start --prepare`: the final cycle acknowledged",
        (S.WAITING_FOR_RESYNC, S.RESYNCHRONIZING): "the next attempt (or `replication resync`) starts it",
        (S.WAITING_FOR_RESYNC, S.ERROR): "a permanent error before the resync started",
        (S.RESYNCHRONIZING, S.REPLICATING): "the resync acknowledged",
        (S.RESYNCHRONIZING, S.WAITING_FOR_RESYNC): "refused with `resync`, or held: the replica's copy "
                                                   "was modified outside replicad",
        (S.RESYNCHRONIZING, S.ERROR): "a permanent error",
        (S.RESYNCHRONIZING, S.PREPARED_FOR_FAILOVER): "`--prepare` asked while a resync ran: it was the final cycle",
        (S.RESYNCHRONIZING, S.RESYNC_SUSPENDED): "`suspend` during a resync: it stops after the segment being sent",
        (S.RESYNC_SUSPENDED, S.RESYNCHRONIZING): "`resume` (or `resync`): the resync continues where it was",
        (S.RESYNC_SUSPENDED, S.WAITING_FOR_RESYNC): "`resync --cancel`: the segments staged on the replica are "
                                                    "discarded; `resync` starts over",
        (S.RESYNC_SUSPENDED, S.SUSPENDED): "the resync's last segment was acknowledged as `suspend` came",
        (S.SUSPENDED, S.READY_FOR_INITIAL): "`resume`, nothing acknowledged yet",
        (S.SUSPENDED, S.REPLICATING): "`resume`",
        (S.SUSPENDED, S.RESYNCHRONIZING): "`replication resync`",
        (S.SUSPENDED, S.WAITING_FOR_RESYNC): "`resume`, a resync due: a continued initial copy was "
                                             "acknowledged while suspended",
        (S.PREPARED_FOR_FAILOVER, S.REPLICATING): "`resume`, or the replica cancelled its failover",
        (S.FAILED_OVER_ELSEWHERE, S.REPLICATING): "the replica cancelled its failover (asked each tick, and by `sync`)",
        **{(s, S.FAILED_OVER_ELSEWHERE): "a cycle refused with `failedover`: the VM failed over to the replica "
           "(fenced: no cycle, no `vm start`, until `reverse` or `remove`)" for s in FENCEABLE},
    },
    REPLICA: {
        (S.INITIAL_IN_PROGRESS, S.REPLICATING): "the first log applied",
        (S.INITIAL_IN_PROGRESS, S.SUSPENDED): "`suspend`",
        (S.REPLICATING, S.SUSPENDED): "`suspend`",
        (S.REPLICATING, S.FAILED_OVER_WAITING): "`failover start`",
        (S.SUSPENDED, S.REPLICATING): "`resume`",
        (S.SUSPENDED, S.INITIAL_IN_PROGRESS): "`resume`, no log applied yet",
        (S.SUSPENDED, S.FAILED_OVER_WAITING): "`failover start`",
        (S.FAILED_OVER_WAITING, S.REPLICATING): "`failover stop`",
        (S.FAILED_OVER_WAITING, S.SUSPENDED): "`failover stop` of a failover started while suspended",
        (S.FAILED_OVER_WAITING, S.FAILED_OVER): "`failover complete`",
        # No code puts a replica in Error any more; a catalog written by an older version may.
        (S.ERROR, S.REPLICATING): "a log applied",
        (S.ERROR, S.SUSPENDED): "`suspend`",
        (S.ERROR, S.FAILED_OVER_WAITING): "`failover start`",
    },
}

# `reverse` turns one role into the other (reverse.py): a new relationship in an ENTRY state replaces it
ROLE_CHANGES: dict[tuple[str, S], tuple[str, frozenset[S]]] = {
    (REPLICA, S.FAILED_OVER_WAITING): (PRIMARY, frozenset({S.REPLICATING, S.RESYNCHRONIZING})),
    (REPLICA, S.FAILED_OVER): (PRIMARY, frozenset({S.REPLICATING, S.RESYNCHRONIZING})),
    # the old primary: planned (prepared), or unplanned (it heard the copy failed over; any state)
    **{(PRIMARY, s): (REPLICA, frozenset({S.REPLICATING})) for s in S if s is not S.NOT_APPLICABLE},
}

# No cycle runs in these: a cycle's outcome finding one found a verb taken while it was in flight (`suspend`;
# `resume` or `start-initial --at` after it). The verb wins: the outcome is recorded, the state stays (§5).
VERB_STATES = frozenset({S.SUSPENDED, S.READY_FOR_INITIAL, S.WAITING_FOR_INITIAL, S.RESYNC_SUSPENDED})
FAILOVER_STATES = (S.REPLICATING, S.ERROR, S.SUSPENDED)  # a replica fails over from these (replica/failovers.py)


def reversed_state(rel: Relationship, resync: bool) -> S:
    """The state of the relationship `replication reverse` creates in place of ``rel``
    (ROLE_CHANGES): a failed-over replica becomes the primary, Resynchronizing when a side
    moved or the failover was unplanned (``resync``), Replicating otherwise; the old primary
    becomes its replica, Replicating. ValueError for a change the diagram lacks."""
    change = ROLE_CHANGES.get((rel.role, rel.state))
    if change is None:
        raise ValueError(f"a {rel.role} in state {rel.state.value} is not reversed")
    role, allowed = change
    state = S.RESYNCHRONIZING if role == PRIMARY and resync else S.REPLICATING
    assert state in allowed and state in ENTRY[role], (role, state)
    return state


class CycleKind(str, Enum):
    INITIAL = "initial"
    DELTA = "delta"
    RESYNC = "resync"


# --- outcomes, errors and verbs ---------------------------------------------------------------

class Failure(Enum):
    HELD = "held"            # an automatic resync would overwrite the replica's own changes
    RESYNC = "resync"        # the replica cannot apply on its copy: resync at the next attempt
    TRANSIENT = "transient"  # another attempt can help: the state is kept
    PERMANENT = "permanent"  # an operator must act: Error, retried at the frequency
    CRASHED = "crashed"      # an unexpected exception: Error, with its traceback in the log


# primary: a cycle
@dataclass(frozen=True)
class InitialStarted:
    """An initial copy starts; ``epoch``: its new epoch, None to continue the interrupted
    copy of the current one from the replica's durable offset."""
    epoch: str | None


@dataclass(frozen=True)
class ResyncStarted:  # a resync starts (the replica's digests are fetched next)
    pass


@dataclass(frozen=True)
class CycleSucceeded:
    """The replica acknowledged log ``seq`` at ``at``. ``resumed``: an initial copy continued
    from the replica's durable offset (a resync makes it consistent next); ``prepared``: the
    prepared record (primary/prepared.py) when this was a consistent `--prepare` cycle."""
    kind: CycleKind
    seq: int
    at: str
    resumed: bool = False
    prepared: dict[str, object] | None = None


@dataclass(frozen=True)
class CycleFailed:
    failure: Failure
    reason: str               # the one line `replication get` shows
    at: str
    failed_over: bool = False  # the replica answered that its copy failed over (code failedover)
    hint: str | None = None
    kind: CycleKind | None = None  # what the cycle was (None: it failed before it was planned)


def failure_of(e: BaseException, at: str, kind: CycleKind | None = None) -> CycleFailed:
    """A cycle's error sorted as zrepl does (docs/design.md §5); ``kind``: the failed cycle's."""
    failed_over = isinstance(e, ReplicadError) and e.code is ErrorCode.FAILED_OVER
    if isinstance(e, ResyncHeld):
        return CycleFailed(Failure.HELD, str(e), at, failed_over, e.hint, kind)
    if isinstance(e, ReplicadError):
        failure = (Failure.RESYNC if e.code is ErrorCode.RESYNC else Failure.TRANSIENT if e.transient
                   else Failure.PERMANENT)
        return CycleFailed(failure, str(e), at, failed_over, e.hint, kind)
    return CycleFailed(Failure.CRASHED, f"internal error: {type(e).__name__}: {e}", at, kind=kind)


def _resync_asked_meanwhile(rel: Relationship, kind: CycleKind | None) -> bool:
    """`resync` was taken while a cycle ran that is not the resync it asks for: a delta (the verb sets
    Resynchronizing at once), a resync that started before it, or one that failed before it was planned
    (``resync_asked``: the verb's has not started; ResyncStarted clears it). Its outcome leaves the resync
    to the next one."""
    return rel.state == S.RESYNCHRONIZING and (rel.resync_asked or (kind is not None and kind != CycleKind.RESYNC))


# primary: the operator's verbs, and what a prepared primary hears from its replica
@dataclass(frozen=True)
class StartInitial:
    vm: str
    at: str | None = None  # `--at`: the supervisor waits until then


@dataclass(frozen=True)
class Seed:  # `start-initial --use-existing`: the first cycle is a resync against a copy adopted there
    vm: str


@dataclass(frozen=True)
class Exported:
    """`start-initial --export`: the initial copy was written to ``folder`` in ``epoch``."""
    epoch: str
    folder: str


@dataclass(frozen=True)
class Resync:
    vm: str
    at: str | None = None  # `--at`: scheduled (WaitingForStartResynchronize until then)


@dataclass(frozen=True)
class ResyncCancelled:
    """`resync --cancel`: a resync waiting to start (scheduled, or for its window) waits for the operator."""
    vm: str


@dataclass(frozen=True)
class Sync:  # `sync`: a cycle now. It changes no state; refused unless replication is established
    vm: str


@dataclass(frozen=True)
class Prepare:
    """`failover start --prepare`: the next cycle is the final one (the engine's flag). It
    changes no state by itself; the cycle's acknowledgement does (CycleSucceeded.prepared)."""
    vm: str


@dataclass(frozen=True)
class ReplicaFailedOver:  # the replica said (an authenticated answer) that its copy failed over
    at: str


@dataclass(frozen=True)
class PrepareCancelled:
    """The replica's failover was cancelled: the point is no longer prepared, the copy no longer failed over."""


# both roles
@dataclass(frozen=True)
class Suspend:  # `suspend`
    vm: str


@dataclass(frozen=True)
class Resume:  # `resume`: a suspended relationship replicates again; a prepared primary's prepare is cancelled
    vm: str


# replica
@dataclass(frozen=True)
class Applied:
    """A log was applied and committed into the replica copy."""


@dataclass(frozen=True)
class FailoverStarted:
    """`failover start` made the failover copy of ``record["point"]`` (``record``: point, time,
    consistency, planned, disks, copy; the state before is added here)."""
    vm: str
    record: dict[str, object]


@dataclass(frozen=True)
class FailoverStopped:
    vm: str


@dataclass(frozen=True)
class FailoverCompleted:
    vm: str


Event = (InitialStarted | ResyncStarted | CycleSucceeded | CycleFailed | StartInitial | Seed | Exported | Resync
         | ResyncCancelled | Sync
         | Prepare | ReplicaFailedOver | PrepareCancelled | Suspend | Resume | Applied | FailoverStarted
         | FailoverStopped | FailoverCompleted)
_PRIMARY_ONLY = (InitialStarted, ResyncStarted, CycleSucceeded, CycleFailed, StartInitial, Seed, Exported, Resync,
                 ResyncCancelled, Sync, Prepare, ReplicaFailedOver, PrepareCancelled)
_REPLICA_ONLY = (Applied, FailoverStarted, FailoverStopped, FailoverCompleted)


def require(rel: Relationship, event: Event) -> None:
    """Refuse ``event`` (an operator's verb) in ``rel``'s state, with the reason the
    operator sees (Conflict); return when ``transition`` will take it."""
    st = rel.state.value
    match event:
        case StartInitial(vm) | Seed(vm):
            if rel.state not in (S.READY_FOR_INITIAL, S.WAITING_FOR_INITIAL, S.ERROR) or rel.seq > 0:
                raise Conflict(f"initial replication of {vm} is not pending (state {st})")
        case Resync(vm):
            if (rel.seq == 0 and not rel.awaiting_import and not rel.seed) or rel.state not in (
                    S.REPLICATING, S.ERROR, S.WAITING_FOR_RESYNC, S.RESYNCHRONIZING, S.SUSPENDED,
                    S.RESYNC_SUSPENDED):
                raise Conflict(f"{vm} cannot be resynchronized in state {st}")
        case ResyncCancelled(vm):
            if rel.state not in (S.WAITING_FOR_RESYNC, S.RESYNC_SUSPENDED):
                raise Conflict(f"{vm} has no resync waiting to start or suspended (state {st})",
                               hint="a running resync cannot be cancelled half way: `replication suspend` stops "
                               "it, then `resync --cancel` discards it" if rel.state == S.RESYNCHRONIZING else None)
        case Sync(vm):
            if rel.state not in (S.REPLICATING, S.ERROR) or rel.seq == 0:
                raise Conflict(f"{vm} is {st}; sync needs an established replication",
                               hint="run `replicad replication start-initial` first" if rel.seq == 0 else
                               "`replicad replication resume` cancels the prepare"
                               if rel.state == S.PREPARED_FOR_FAILOVER else None)
        case Prepare(vm):
            if rel.state not in (S.REPLICATING, S.ERROR) or rel.seq == 0:
                raise Conflict(f"{vm} cannot be prepared in state {st}")
        case Suspend(vm):
            if rel.state not in (S.SUSPENDED, S.REPLICATING, S.ERROR, S.INITIAL_IN_PROGRESS, S.WAITING_FOR_INITIAL,
                                 S.RESYNCHRONIZING, S.RESYNC_SUSPENDED):
                raise Conflict(f"cannot suspend replication of {vm} in state {st}")
        case Resume(vm):
            if rel.state != S.SUSPENDED and not (rel.role == PRIMARY and rel.state in (S.PREPARED_FOR_FAILOVER,
                                                                                         S.RESYNC_SUSPENDED)):
                raise Conflict(f"replication of {vm} is not suspended (state {st})")
        case FailoverStarted(vm):
            if rel.state not in FAILOVER_STATES:
                raise Conflict(f"{vm} cannot fail over in state {st}")
        case FailoverStopped(vm):
            if rel.state != S.FAILED_OVER_WAITING:
                raise Conflict(f"no failover of {vm} to stop here (state {st})")
        case FailoverCompleted(vm):
            if rel.state != S.FAILED_OVER_WAITING:
                raise Conflict(f"{vm} has no failover waiting for completion (state {st})")
        case _:
            pass


def _heard_failed_over(rel: Relationship, at: str) -> dict[str, object]:
    """What an unplanned reverse needs this primary to have heard (reverse.py): the first time."""
    return rel.replica_failed_over or {"epoch": rel.epoch, "seq": rel.seq, "at": at}


def transition(rel: Relationship, event: Event) -> Relationship:
    """``rel`` after ``event``: a new Relationship (``rel`` is not changed). A verb refused in
    ``rel``'s state raises Conflict (``require``); an event of the other role, ValueError."""
    if (rel.role == PRIMARY and isinstance(event, _REPLICA_ONLY)) or \
            (rel.role == REPLICA and isinstance(event, _PRIMARY_ONLY)):
        raise ValueError(f"{type(event).__name__} does not happen to a {rel.role} relationship")
    require(rel, event)
    new = dataclasses.replace
    match event:
        case InitialStarted(epoch):  # suspended (and resumed) since the cycle began: the verb's state stays
            state = rel.state if rel.state in (S.SUSPENDED, S.READY_FOR_INITIAL) else S.INITIAL_IN_PROGRESS
            return new(rel, state=state, epoch=epoch if epoch is not None else rel.epoch)
        case ResyncStarted():
            return new(rel, state=S.RESYNCHRONIZING, resync_at=None, resync_asked=False)
        case CycleSucceeded(kind, seq, at, resumed, prepared):
            out = new(rel, seq=seq, error=None, replica_failed_over={}, last_replication_time=at)
            if kind == CycleKind.RESYNC:
                out = new(out, awaiting_import=None, seed=False, resync_hold=None, resync_due=False, resync_at=None,
                          resync_progress={})
            if _resync_asked_meanwhile(rel, kind):  # the verb wins: no prepare, the resync is next
                return out
            if rel.state == S.RESYNC_SUSPENDED:  # the resync done as `suspend` came: Suspended; else still due
                return new(out, state=S.SUSPENDED, resync_progress={}) if kind == CycleKind.RESYNC else out
            if rel.state == S.SUSPENDED:  # suspended while it ran: the acknowledgement is recorded, no more;
                # not prepared, and a continued initial copy's resync is due when replication resumes
                return new(out, resync_due=out.resync_due or resumed)
            # Ready/Waiting (resumed, or start-initial --at, while it ran) said "nothing acknowledged
            # yet": no longer true, so the state is the one `resume` gives an acknowledged copy
            if rel.state in (S.INITIAL_IN_PROGRESS, S.ERROR, S.READY_FOR_INITIAL, S.WAITING_FOR_INITIAL,
                             S.RESYNCHRONIZING):
                out = new(out, state=S.REPLICATING)
            if resumed:  # the copy holds blocks read at two times: compare both copies once, now
                out = new(out, state=S.WAITING_FOR_RESYNC)
            if prepared is not None and out.state != S.WAITING_FOR_RESYNC:  # a copy due a resync is no point
                out = new(out, state=S.PREPARED_FOR_FAILOVER, prepared=dict(prepared))  # to fail over to
            return out
        case CycleFailed(failure, reason, at, failed_over, _, kind):
            out = new(rel, replica_failed_over=_heard_failed_over(rel, at)) if failed_over else new(rel)
            # a verb taken while it ran wins: the error is recorded, not the state
            if rel.state in VERB_STATES or _resync_asked_meanwhile(rel, kind):
                return new(out, error=f"resynchronization required: {reason}" if failure in (
                    Failure.HELD, Failure.RESYNC) else reason)
            if failed_over and rel.state in FENCEABLE and rel.seq or rel.state == S.FAILED_OVER_ELSEWHERE:
                return new(out, state=S.FAILED_OVER_ELSEWHERE, error=reason)  # fenced: the copy runs there (19.4)
            if failure == Failure.HELD:
                hold = f"resynchronization required: {reason}"
                return new(out, state=S.WAITING_FOR_RESYNC, resync_hold=hold, error=hold)
            if failure == Failure.RESYNC:
                error = (f"waiting for the replica to import the initial copy exported to {rel.awaiting_import} "
                         f"(`replication import-initial` there); until then: {reason}" if rel.awaiting_import
                         else f"resynchronization required: {reason}")
                return new(out, state=S.WAITING_FOR_RESYNC, error=error)
            return new(out, error=reason, state=rel.state if failure == Failure.TRANSIENT else S.ERROR)
        case StartInitial(_, at):
            # a plain start-initial abandons an earlier `--use-existing` or `--export` that failed
            return new(rel, state=S.WAITING_FOR_INITIAL if at else S.INITIAL_IN_PROGRESS, start_at=at or None,
                       error=None, seed=False, awaiting_import=None)
        case Seed():
            return new(rel, seed=True, state=S.WAITING_FOR_RESYNC, error=None, start_at=None)
        case Exported(epoch, folder):
            return new(rel, state=S.WAITING_FOR_RESYNC, epoch=epoch, awaiting_import=folder,
                       error=f"waiting for the replica to import the initial copy exported to {folder} "
                             "(`replication import-initial`)")
        case Resync(_, at) if rel.state == S.RESYNC_SUSPENDED and not at:  # continues where it was
            return new(rel, state=S.RESYNCHRONIZING, resync_hold=None)
        case Resync(_, at):
            return new(rel, state=S.WAITING_FOR_RESYNC if at else S.RESYNCHRONIZING, resync_hold=None, resync_at=at,
                       resync_asked=not at)
        case ResyncCancelled():
            hold = "the operator cancelled the resync (`replication resync --cancel`); `replication resync` starts it"
            return new(rel, state=S.WAITING_FOR_RESYNC, resync_at=None, resync_asked=False, resync_hold=hold,
                       resync_progress={},
                       error=f"resynchronization required: {hold}")
        case Sync() | Prepare():  # a cycle is asked for: the state is the cycle's to change
            return new(rel)
        case ReplicaFailedOver(at):
            return new(rel, replica_failed_over=_heard_failed_over(rel, at))
        case PrepareCancelled():
            return new(rel, state=S.REPLICATING, prepared={}, replica_failed_over={}, error=None)
        case Suspend():
            return new(rel, state=S.RESYNC_SUSPENDED if rel.state in (S.RESYNCHRONIZING, S.RESYNC_SUSPENDED)
                       else S.SUSPENDED)
        case Resume():
            if rel.state == S.PREPARED_FOR_FAILOVER:  # the prepare is cancelled
                return new(rel, state=S.REPLICATING, prepared={})
            if rel.state == S.RESYNC_SUSPENDED:  # the resync continues where it was (primary/resync_segments.py)
                return new(rel, state=S.RESYNCHRONIZING)
            if rel.role == PRIMARY:
                return new(rel, state=S.READY_FOR_INITIAL if rel.seq == 0 else
                           S.WAITING_FOR_RESYNC if rel.resync_due else S.REPLICATING, resync_due=False)
            return new(rel, state=S.REPLICATING if rel.applied_seq > 0 else S.INITIAL_IN_PROGRESS)
        case Applied():
            return new(rel, state=S.REPLICATING if rel.state in (S.INITIAL_IN_PROGRESS, S.ERROR) else rel.state)
        case FailoverStarted(_, record):
            return new(rel, state=S.FAILED_OVER_WAITING, failover={**record, "before": rel.state.value})
        case FailoverStopped():
            before = rel.failover.get("before", S.REPLICATING.value)
            # a cancelled planned failover: the prepared primary learns of it from the replica's status
            return new(rel, state=S.SUSPENDED if before == S.SUSPENDED.value else S.REPLICATING,
                       prepared_seq=0 if rel.failover.get("planned") else rel.prepared_seq,
                       failover={}, discard_ok=False)
        case FailoverCompleted():
            # the copy is the failover point's, and it is what the relationship reports
            f = rel.failover
            point = int(f["point"])
            return new(rel, state=S.FAILED_OVER, points=[], applied_seq=point, seq=point,
                       last_point_time=f.get("time") or rel.last_point_time,
                       last_consistency=f.get("consistency") or rel.last_consistency,
                       prepared_seq=rel.prepared_seq if rel.prepared_seq == point else 0,
                       failover={**f, "completed": True})
    raise ValueError(f"unknown event {event!r}")

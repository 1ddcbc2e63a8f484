"""The replication state machine alone (src/replicad/replication_states.py, issue 16.4).

A small model drives ``transition`` as the daemon does: the primary's supervisor starts a
cycle when ``schedule`` says so, of the kind ``plan_cycle`` says, and the cycle ends
acknowledged or with any kind of error, while the operator's verbs (start-initial and its
seed and export, resync, suspend, resume, prepare) and what a prepared primary hears from
its replica arrive at any moment in between; on a replica, logs are received and applied,
and failovers start, stop and complete. Then:

- no sequence of them, from the states a relationship is created in, makes a change of
  state that the documented diagram (``EDGES``) lacks (hypothesis, as
  tests/faults/test_apply_model.py tests apply);
- exhaustively, from every reachable state and with every event, the changes the code
  makes are exactly ``EDGES``: none undocumented, none documented that never happens;
- examples pin today's behaviour (a `resync` answer, a held resync, a transient or
  permanent error, a crash, a resumed initial copy, the verbs' refusals), and the error
  codes a peer sees are the ones it always saw."""

from __future__ import annotations

import ast
import dataclasses
from collections import deque
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replicad import replication_schedule as sched
from replicad import replication_states as rs
from replicad.errors import (
    Conflict,
    ErrorCode,
    FailedOver,
    PeerError,
    ReplicadError,
    ResyncHeld,
    ResyncRequired,
    answer_code,
    local_error,
)
from replicad.model import Relationship
from replicad.model import ReplicationState as S
from replicad.replication_schedule import Step
from replicad.replication_states import EDGES, ENTRY, CycleKind, Failure

ROOT = Path(__file__).resolve().parents[2]
AT = "2026-11-29T12:00:00Z"
WALL = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


# --- the model ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class InFlight:
    """A primary's cycle between its start and its end."""
    kind: CycleKind
    automatic: bool
    seq: int
    resumed: bool
    prepare: bool


@dataclasses.dataclass(frozen=True)
class World:
    rel: Relationship
    cycle: InFlight | None = None
    prepare_next: bool = False


PRIMARY_ACTIONS: list[tuple] = (
    [("cycle_start", requested, resume, replica_seq) for requested in (False, True) for resume in (False, True)
     for replica_seq in (0, 1)]
    + [("cycle_ok", fuzzy) for fuzzy in (False, True)]
    + [("cycle_failed", f, failed_over) for f in Failure for failed_over in (False, True)]
    + [("start_initial", at) for at in (None, "2030-01-01T00:00:00Z")]
    + [("resync_at",), ("resync_cancel",)]
    + [("seed",), ("export",), ("resync",), ("suspend",), ("resume",), ("prepare",), ("heard_failed_over",),
       ("prepare_cancelled",)])
REPLICA_ACTIONS: list[tuple] = [("receive",), ("apply",), ("suspend",), ("resume",), ("failover_start", False),
                                ("failover_start", True), ("failover_stop",), ("failover_complete",)]


def step(w: World, action: tuple) -> tuple[World, list[tuple[S, S]]] | None:
    """``w`` after ``action``, with the changes of state it made; None when the action cannot
    happen in ``w`` (a refused verb is one that happens and changes nothing)."""
    changes: list[tuple[S, S]] = []

    def go(rel: Relationship, event: rs.Event) -> Relationship:
        new = rs.transition(rel, event)
        if new.state != rel.state:
            changes.append((rel.state, new.state))
        return new

    try:
        if w.rel.role == "primary":
            w = _primary(w, action, go)
        else:
            w = _replica(w, action, go)
    except Conflict:
        return w, []  # refused: nothing changes
    except _NotNow:
        return None
    return w, changes


class _NotNow(Exception):
    pass


def _primary(w: World, action: tuple, go) -> World:
    rel, name = w.rel, action[0]
    if name == "cycle_start":
        _, requested, resume, replica_seq = action
        if w.cycle is not None:
            raise _NotNow
        nxt = sched.schedule(rel, "vm", requested=requested, last_start=0.0, backoff=1.0, now=1e9, wall=WALL)
        if nxt.step != Step.RUN:
            raise _NotNow
        plan = sched.plan_cycle(rel)
        resumed = False
        if plan.kind == CycleKind.RESYNC:
            rel = go(rel, rs.ResyncStarted())
            rel = dataclasses.replace(rel, seq=min(rel.seq, replica_seq), epoch="e3")  # the replica's applied point
        elif plan.kind == CycleKind.INITIAL:
            resumed = resume and bool(rel.epoch) and rel.seq == 0
            rel = go(rel, rs.InitialStarted(None if resumed else "e2"))
        prepare = w.prepare_next and plan.kind != CycleKind.INITIAL
        return World(rel, InFlight(plan.kind, plan.automatic, min(rel.seq + 1, 2), resumed, prepare),
                     w.prepare_next and not prepare)
    if name == "cycle_ok":
        if w.cycle is None:
            raise _NotNow
        c, fuzzy = w.cycle, action[1]
        record = {"epoch": rel.epoch, "seq": c.seq} if c.prepare and not fuzzy else None
        rel = go(rel, rs.CycleSucceeded(c.kind, c.seq, AT, resumed=c.resumed, prepared=record))
        return World(rel, None, w.prepare_next)
    if name == "cycle_failed":
        _, failure, failed_over = action
        if w.cycle is None or (failure == Failure.HELD and not w.cycle.automatic):
            raise _NotNow
        rel = go(rel, rs.CycleFailed(failure, "boom", AT, failed_over, kind=w.cycle.kind))
        return World(rel, None, w.prepare_next)
    if name == "start_initial":
        return dataclasses.replace(w, rel=go(rel, rs.StartInitial("vm", action[1])))
    if name == "seed":
        return dataclasses.replace(w, rel=go(rel, rs.Seed("vm")))
    if name == "export":  # refused as start-initial is; the supervisor is stopped while it writes
        rs.require(rel, rs.StartInitial("vm"))
        return World(go(rel, rs.Exported("e4", "/media/vm")), None, w.prepare_next)
    if name == "resync":
        return dataclasses.replace(w, rel=go(rel, rs.Resync("vm")))
    if name == "resync_at":  # `resync --at` (a time passed: the supervisor's schedule runs it at once)
        return dataclasses.replace(w, rel=go(rel, rs.Resync("vm", "2026-11-29T11:00:00Z")))
    if name == "resync_cancel":
        return dataclasses.replace(w, rel=go(rel, rs.ResyncCancelled("vm")))
    if name == "suspend":
        return dataclasses.replace(w, rel=go(rel, rs.Suspend("vm")))
    if name == "resume":
        return dataclasses.replace(w, rel=go(rel, rs.Resume("vm")))
    if name == "prepare":  # the refusal, then the engine's flag for the next cycle
        return World(go(rel, rs.Prepare("vm")), w.cycle, True)
    if name in ("heard_failed_over", "prepare_cancelled"):  # primary/prepared.py, while prepared
        if rel.state != S.PREPARED_FOR_FAILOVER and not (name == "prepare_cancelled"
                                                          and rel.state == S.FAILED_OVER_ELSEWHERE):
            raise _NotNow  # a fenced primary asks too (issue 19.4)
        event = rs.ReplicaFailedOver(AT) if name == "heard_failed_over" else rs.PrepareCancelled()
        return dataclasses.replace(w, rel=go(rel, event))
    raise _NotNow


def _replica(w: World, action: tuple, go) -> World:
    rel, name = w.rel, action[0]
    failed_over = rel.state in (S.FAILED_OVER_WAITING, S.FAILED_OVER)
    if name == "receive":  # replica/receiving.py refuses a suspended or failed-over copy's logs
        if failed_over or rel.state == S.SUSPENDED or rel.seq >= 3:
            raise _NotNow
        return World(dataclasses.replace(rel, seq=rel.seq + 1))
    if name == "apply":
        if failed_over or rel.applied_seq >= rel.seq:
            raise _NotNow
        return World(go(dataclasses.replace(rel, applied_seq=rel.applied_seq + 1), rs.Applied()))
    if name == "suspend":
        return World(go(rel, rs.Suspend("vm")))
    if name == "resume":
        return World(go(rel, rs.Resume("vm")))
    if name == "failover_start":  # replica/failovers.py: a move while waiting changes no state
        if rel.state == S.FAILED_OVER_WAITING:
            raise _NotNow
        rs.require(rel, rs.FailoverStarted("vm", {}))
        if rel.applied_seq == 0:
            raise Conflict("no complete copy")
        rel = dataclasses.replace(rel, seq=rel.applied_seq)  # what could not be applied is discarded
        return World(go(rel, rs.FailoverStarted("vm", {"point": rel.applied_seq, "planned": action[1]})))
    if name == "failover_stop":
        return World(go(rel, rs.FailoverStopped("vm")))
    if name == "failover_complete":
        return World(go(rel, rs.FailoverCompleted("vm")))
    raise _NotNow


def entries() -> list[World]:
    """The relationships as the daemon creates them (replication_states.ENTRY)."""
    return [World(Relationship(vm_id="v", role="primary")),                                    # enable
            World(Relationship(vm_id="v", role="primary", state=S.REPLICATING, seq=1, epoch="e1")),  # reverse
            World(Relationship(vm_id="v", role="primary", state=S.RESYNCHRONIZING, seq=1, epoch="e1")),
            World(Relationship(vm_id="v", role="replica", state=S.INITIAL_IN_PROGRESS, epoch="e1")),  # first log
            World(Relationship(vm_id="v", role="replica", state=S.REPLICATING, seq=1, applied_seq=1)),  # reverse
            # a replica in Error: no code enters it now, a catalog from an older version may hold it
            World(Relationship(vm_id="v", role="replica", state=S.ERROR, seq=1, applied_seq=1))]


def key(w: World) -> tuple:
    """What the next changes of state depend on (the abstraction the exhaustive walk uses)."""
    r = w.rel
    return (r.role, r.state, min(r.seq, 3), min(r.applied_seq, 3), r.seed, bool(r.awaiting_import),
            bool(r.resync_hold), r.resync_due, r.error is None, bool(r.epoch), bool(r.replica_failed_over),
            bool(r.prepared),
            r.failover.get("before"), bool(r.failover.get("planned")), r.prepared_seq > 0, w.cycle, w.prepare_next)


def walk() -> tuple[set[tuple[str, S, S]], set[tuple[str, S]]]:
    """Every change of state reachable from the entries, with any event at every step."""
    seen: dict[tuple, World] = {}
    todo = deque(entries())
    edges: set[tuple[str, S, S]] = set()
    states: set[tuple[str, S]] = set()
    while todo:
        w = todo.popleft()
        if key(w) in seen:
            continue
        seen[key(w)] = w
        states.add((w.rel.role, w.rel.state))
        for action in PRIMARY_ACTIONS if w.rel.role == "primary" else REPLICA_ACTIONS:
            out = step(w, action)
            if out is not None:
                edges |= {(w.rel.role, a, b) for a, b in out[1]}
                todo.append(out[0])
    return edges, states


# --- the diagram ----------------------------------------------------------------------------

def test_the_entries_are_the_documented_ones() -> None:
    for w in entries()[:-1]:
        assert w.rel.state in ENTRY[w.rel.role], w.rel


@settings(max_examples=300, deadline=None)
@given(start=st.integers(0, 5), picks=st.lists(st.integers(0, 10**6), max_size=40))
def test_no_sequence_of_outcomes_and_verbs_leaves_the_diagram(start: int, picks: list[int]) -> None:
    w = entries()[start]
    actions = PRIMARY_ACTIONS if w.rel.role == "primary" else REPLICA_ACTIONS
    for pick in picks:
        out = step(w, actions[pick % len(actions)])
        if out is None:
            continue
        w, changes = out
        for a, b in changes:
            assert (a, b) in EDGES[w.rel.role], f"{w.rel.role}: {a.value} -> {b.value} is not in the diagram"


def test_the_diagram_is_exactly_what_the_code_does() -> None:
    """From every reachable state, every event: the changes made are the diagram's, all of
    them (a documented edge the code never takes fails too)."""
    edges, states = walk()
    documented = {(role, a, b) for role, es in EDGES.items() for a, b in es}
    assert edges - documented == set(), "changes of state the diagram lacks"
    assert documented - edges == set(), "documented changes of state the code never makes"
    for role, es in EDGES.items():
        for a, b in es:
            assert (role, a) in states and (role, b) in states


def test_docs_show_the_diagram() -> None:
    """docs/design.md §5 lists every edge, with its cause, as the code has it."""
    doc = (ROOT / "docs" / "design.md").read_text()
    for role, es in EDGES.items():
        for (a, b), cause in es.items():
            row = f"| {role} | {a.value} | {b.value} | {cause} |"
            assert row in doc, f"docs/design.md lacks: {row}"


def test_every_change_of_state_goes_through_transition() -> None:
    """No module but replication_states.py assigns a ReplicationState to a relationship's
    ``state`` (a new relationship is created in one of ENTRY's states)."""
    offenders = []
    for path in sorted((ROOT / "src" / "replicad").rglob("*.py")):
        if path.name in ("replication_states.py", "model.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
            for t in targets:
                for el in (t.elts if isinstance(t, ast.Tuple) else [t]):
                    if isinstance(el, ast.Attribute) and el.attr == "state" and "VMState" not in ast.unparse(node):
                        offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "dataclasses.replace" and \
                    any(k.arg == "state" for k in node.keywords):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert offenders == []


# --- today's behaviour, by example ------------------------------------------------------------

def primary(**kw) -> Relationship:
    base: dict = dict(vm_id="v", role="primary", state=S.REPLICATING, seq=4, epoch="e1")
    base.update(kw)
    return Relationship(**base)


def failed(e: BaseException, rel: Relationship) -> Relationship:
    return rs.transition(rel, rs.failure_of(e, AT))


def test_a_resync_answer_waits_for_a_resync() -> None:
    e = PeerError("vmhost1 answered 409: gap", status=409, transient=False, code=ErrorCode.of("resync"))
    out = failed(e, primary())
    assert (out.state, out.error) == (S.WAITING_FOR_RESYNC, "resynchronization required: vmhost1 answered 409: gap")
    assert failed(ResyncRequired("baseline lost"), primary()).state == S.WAITING_FOR_RESYNC
    waiting = failed(ResyncRequired("gap"), primary(seq=0, awaiting_import="/media"))
    assert waiting.error.startswith("waiting for the replica to import the initial copy exported to /media")
    assert sched.plan_cycle(out) == sched.CyclePlan(CycleKind.RESYNC, automatic=True)


def test_a_held_resync_waits_for_the_operator() -> None:
    out = failed(ResyncHeld("the copy was modified", hint="`replicad replication resync`"),
                 primary(state=S.RESYNCHRONIZING))
    assert out.state == S.WAITING_FOR_RESYNC and out.resync_hold == out.error == \
        "resynchronization required: the copy was modified (`replicad replication resync`)"
    assert sched.schedule(out, "vm", requested=True, last_start=None, backoff=1, now=0, wall=WALL).step == Step.IDLE
    assert rs.transition(out, rs.Resync("vm")).resync_hold is None


@pytest.mark.parametrize("state", [S.REPLICATING, S.INITIAL_IN_PROGRESS, S.WAITING_FOR_RESYNC, S.RESYNCHRONIZING])
def test_transient_errors_keep_the_state_and_permanent_ones_set_error(state: S) -> None:
    rel = primary(state=state)
    assert failed(local_error(OSError(28, "No space left on device")), rel).state == state
    assert failed(ReplicadError("interrupted", transient=True), rel).state == state
    out = failed(PeerError("vmhost1 answered 403: refused", status=403, transient=False), rel)
    assert (out.state, out.error) == (S.ERROR, "vmhost1 answered 403: refused")
    crashed = failed(KeyError("disks"), rel)
    assert (crashed.state, crashed.error) == (S.ERROR, "internal error: KeyError: 'disks'")


def test_a_failed_over_answer_is_recorded_once() -> None:
    e = PeerError("failed over", status=409, transient=False, code=ErrorCode.of("failedover"))
    out = failed(e, primary())
    # fenced (issue 19.4): the VM failed over there; no more cycles, and it stays fenced
    assert out.state == S.FAILED_OVER_ELSEWHERE and out.replica_failed_over == {"epoch": "e1", "seq": 4, "at": AT}
    fenced = sched.schedule(out, "vm", requested=True, last_start=None, backoff=1, now=0, wall=WALL)
    assert fenced.step == Step.PREPARED and "failed over" in str(fenced.refusal)  # no cycle: it asks the replica
    assert failed(e, primary(seq=0)).state == S.ERROR  # nothing acknowledged: not its copy that failed over
    again = rs.transition(dataclasses.replace(out, seq=9), rs.failure_of(e, "later"))
    assert again.replica_failed_over == out.replica_failed_over and again.state == S.FAILED_OVER_ELSEWHERE
    assert rs.transition(failed(e, primary(state=S.SUSPENDED)), rs.Resume("vm")).state == S.REPLICATING
    assert rs.transition(out, rs.CycleSucceeded(CycleKind.DELTA, 5, AT)).replica_failed_over == {}


def test_an_acknowledged_cycle() -> None:
    first = primary(state=S.INITIAL_IN_PROGRESS, seq=0, error="x")
    out = rs.transition(first, rs.CycleSucceeded(CycleKind.INITIAL, 1, AT))
    assert (out.state, out.seq, out.error, out.last_replication_time) == (S.REPLICATING, 1, None, AT)
    resumed = rs.transition(first, rs.CycleSucceeded(CycleKind.INITIAL, 1, AT, resumed=True))
    assert resumed.state == S.WAITING_FOR_RESYNC and sched.plan_cycle(resumed).kind == CycleKind.RESYNC
    seeded = primary(state=S.RESYNCHRONIZING, seq=0, seed=True, awaiting_import="/m", resync_hold="h")
    out = rs.transition(seeded, rs.CycleSucceeded(CycleKind.RESYNC, 1, AT))
    assert (out.seed, out.awaiting_import, out.resync_hold, out.state) == (False, None, None, S.REPLICATING)
    prepared = rs.transition(primary(), rs.CycleSucceeded(CycleKind.DELTA, 5, AT, prepared={"seq": 5}))
    assert (prepared.state, prepared.prepared) == (S.PREPARED_FOR_FAILOVER, {"seq": 5})
    assert rs.transition(primary(state=S.SUSPENDED), rs.CycleSucceeded(CycleKind.DELTA, 5, AT)).state == S.SUSPENDED


def test_transition_leaves_its_argument_alone() -> None:
    rel = primary()
    rs.transition(rel, rs.Suspend("vm"))
    assert rel.state == S.REPLICATING


def test_plan_cycle() -> None:
    assert sched.plan_cycle(primary(state=S.INITIAL_IN_PROGRESS, seq=0)).kind == CycleKind.INITIAL
    assert sched.plan_cycle(primary(state=S.ERROR, seq=0)).kind == CycleKind.INITIAL
    assert sched.plan_cycle(primary()).kind == CycleKind.DELTA
    assert sched.plan_cycle(primary(state=S.WAITING_FOR_RESYNC, seq=0, seed=True)) == \
        sched.CyclePlan(CycleKind.RESYNC, automatic=False)
    assert sched.plan_cycle(primary(state=S.RESYNCHRONIZING)) == sched.CyclePlan(CycleKind.RESYNC, automatic=False)


def test_schedule() -> None:
    kw = dict(requested=False, backoff=4.0, now=100.0, wall=WALL)
    assert sched.schedule(primary(frequency=30), "vm", last_start=None, **kw).step == Step.RUN
    assert sched.schedule(primary(frequency=30), "vm", last_start=90.0, **kw) == sched.Next(Step.WAIT, until=120.0)
    # after a failure, or when a resync waits: the backoff, at most the frequency
    assert sched.schedule(primary(frequency=30, error="x"), "vm", last_start=98.0, **kw).until == 102.0
    assert sched.schedule(primary(frequency=30, error="x"), "vm", last_start=90.0, **kw).step == Step.RUN
    assert sched.schedule(primary(frequency=2, state=S.WAITING_FOR_RESYNC), "vm", last_start=99.0, **kw).until == 101.0
    assert sched.schedule(primary(frequency=30), "vm", last_start=90.0, **{**kw, "requested": True}).step == Step.RUN
    later = primary(state=S.WAITING_FOR_INITIAL, seq=0, start_at="2026-11-29T12:01:00Z")
    assert sched.schedule(later, "vm", last_start=None, **kw) == sched.Next(Step.WAIT, until=160.0)
    ready = sched.schedule(primary(state=S.READY_FOR_INITIAL, seq=0), "vm", last_start=None, **kw)
    assert ready.step == Step.IDLE and str(ready.refusal) == "replication of this VM is ReadyForInitialReplication"
    prepared = sched.schedule(primary(state=S.PREPARED_FOR_FAILOVER, frequency=30), "vm", last_start=None, **kw)
    assert prepared.step == Step.PREPARED and prepared.until == 130.0
    assert str(prepared.refusal) == ("vm is prepared for failover (`replicad replication resume` cancels the "
                                     "prepare)")


@pytest.mark.parametrize("rel, event, message", [
    (primary(), rs.StartInitial("vm"), "initial replication of vm is not pending (state Replicating)"),
    (primary(state=S.ERROR, seq=3), rs.Seed("vm"), "initial replication of vm is not pending (state Error)"),
    (primary(state=S.READY_FOR_INITIAL, seq=0), rs.Resync("vm"),
     "vm cannot be resynchronized in state ReadyForInitialReplication"),
    (primary(state=S.WAITING_FOR_RESYNC), rs.Suspend("vm"),
     "cannot suspend replication of vm in state WaitingForStartResynchronize"),
    (primary(), rs.Resume("vm"), "replication of vm is not suspended (state Replicating)"),
    (primary(state=S.READY_FOR_INITIAL, seq=0), rs.Sync("vm"),
     "vm is ReadyForInitialReplication; sync needs an established replication (run `replicad replication "
     "start-initial` first)"),
    (primary(state=S.PREPARED_FOR_FAILOVER), rs.Sync("vm"), "vm is PreparedForFailover; sync needs an established "
     "replication (`replicad replication resume` cancels the prepare)"),
    (primary(state=S.SUSPENDED), rs.Prepare("vm"), "vm cannot be prepared in state Suspended"),
    (primary(role="replica", state=S.INITIAL_IN_PROGRESS), rs.FailoverStarted("vm", {}),
     "vm cannot fail over in state InitialReplicationInProgress"),
    (primary(role="replica"), rs.FailoverStopped("vm"), "no failover of vm to stop here (state Replicating)"),
    (primary(role="replica"), rs.FailoverCompleted("vm"),
     "vm has no failover waiting for completion (state Replicating)"),
])
def test_verbs_are_refused_in_the_wrong_state_with_the_reason(rel, event, message) -> None:
    with pytest.raises(Conflict) as e:
        rs.transition(rel, event)
    assert str(e.value) == message


def test_verbs() -> None:
    assert rs.transition(primary(state=S.SUSPENDED, seq=0), rs.Resume("vm")).state == S.READY_FOR_INITIAL
    assert rs.transition(primary(state=S.SUSPENDED), rs.Resume("vm")).state == S.REPLICATING
    cancelled = rs.transition(primary(state=S.PREPARED_FOR_FAILOVER, prepared={"seq": 4}), rs.Resume("vm"))
    assert (cancelled.state, cancelled.prepared) == (S.REPLICATING, {})
    replica = primary(role="replica", state=S.SUSPENDED, seq=2, applied_seq=0)
    assert rs.transition(replica, rs.Resume("vm")).state == S.INITIAL_IN_PROGRESS
    at = rs.transition(primary(state=S.READY_FOR_INITIAL, seq=0), rs.StartInitial("vm", "2030-01-01T00:00:00Z"))
    assert (at.state, at.start_at) == (S.WAITING_FOR_INITIAL, "2030-01-01T00:00:00Z")
    out = rs.transition(primary(state=S.ERROR, seq=0), rs.Exported("e9", "/media"))
    assert (out.state, out.epoch, out.awaiting_import) == (S.WAITING_FOR_RESYNC, "e9", "/media")
    with pytest.raises(ValueError):
        rs.transition(primary(), rs.Applied())


def test_a_failover_stopped_returns_to_the_state_before_and_completed_reports_its_point() -> None:
    rel = primary(role="replica", state=S.SUSPENDED, seq=6, applied_seq=6, prepared_seq=6)
    out = rs.transition(rel, rs.FailoverStarted("vm", {"point": 5, "planned": True, "time": "t"}))
    assert out.state == S.FAILED_OVER_WAITING and out.failover["before"] == "Suspended"
    back = rs.transition(out, rs.FailoverStopped("vm"))
    assert (back.state, back.failover, back.prepared_seq) == (S.SUSPENDED, {}, 0)
    done = rs.transition(out, rs.FailoverCompleted("vm"))
    assert (done.state, done.seq, done.applied_seq, done.prepared_seq, done.last_point_time) == \
        (S.FAILED_OVER, 5, 5, 0, "t")
    assert done.failover["completed"] is True


def test_reverse_creates_the_other_role_in_an_entry_state() -> None:
    for state in (S.FAILED_OVER_WAITING, S.FAILED_OVER):
        replica = primary(role="replica", state=state)
        assert rs.reversed_state(replica, True) == S.RESYNCHRONIZING
        assert rs.reversed_state(replica, False) == S.REPLICATING
    assert rs.reversed_state(primary(state=S.PREPARED_FOR_FAILOVER), False) == S.REPLICATING
    assert rs.reversed_state(primary(state=S.ERROR), True) == S.REPLICATING  # unplanned: any state
    with pytest.raises(ValueError):
        rs.reversed_state(primary(role="replica"), True)  # not failed over


# --- the errors' codes --------------------------------------------------------------------------

def test_the_codes_a_peer_sees_are_unchanged() -> None:
    assert answer_code(ResyncRequired("gap")) == "resync"
    assert answer_code(ResyncHeld("held")) == "resync"
    assert answer_code(FailedOver.of("vm")) == "failedover"
    assert answer_code(Conflict("no")) == "conflict"
    assert answer_code(ReplicadError("no")) == "replicaderror"
    assert answer_code(PeerError("relayed", status=409, transient=False, code=ErrorCode.RESYNC)) == "peererror"


def test_a_peers_code_is_typed_and_anything_else_is_none() -> None:
    assert ErrorCode.of("resync") is ErrorCode.RESYNC and ErrorCode.of("failedover") is ErrorCode.FAILED_OVER
    for other in ("", "conflict", "RESYNC", None, 7, ["resync"]):
        assert ErrorCode.of(other) is None


def test_transient_is_a_constructor_argument() -> None:
    assert ReplicadError("x").transient is False and ReplicadError("x", transient=True).transient is True
    assert PeerError("x", status=503, transient=True).transient is True
    assert local_error(OSError(5, "EIO")).transient is True
    assert ReplicadError.transient is False  # the class's default is not changed by an instance

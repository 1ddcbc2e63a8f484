"""When a needed resync runs (resync_policy.py, issue 20 item 4) and the verbs that steer it
(replication_states: `resync --at`, `resync --cancel`), as pure functions."""

import dataclasses
from datetime import UTC, datetime

import pytest

from replicad import replication_schedule as sched
from replicad import replication_states as rs
from replicad.errors import Conflict
from replicad.model import Relationship
from replicad.model import ReplicationState as S
from replicad.resync_policy import decide

WALL = datetime(2026, 11, 29, 22, 0, tzinfo=UTC)


def waiting(**kw) -> Relationship:
    return Relationship(vm_id="v", role="primary", state=S.WAITING_FOR_RESYNC, seq=5, epoch="e", **kw)


def test_an_automatic_resync_runs_as_auto_resync_says():
    assert decide(waiting(), True, WALL).wait == 0.0
    assert decide(waiting(auto_resync="off"), True, WALL).idle is not None
    later = decide(waiting(auto_resync="window", resync_window="01:00-05:00"), True, WALL)
    assert later.wait == 3 * 3600 and later.idle is None
    assert decide(waiting(auto_resync="window", resync_window="21:30-01:00"), True, WALL).wait == 0.0
    # the operator's own resync is not the policy's to hold
    assert decide(waiting(auto_resync="off"), False, WALL).wait == 0.0


def test_a_scheduled_resync_runs_at_its_time_whatever_the_policy():
    rel = waiting(auto_resync="off", resync_at="2026-11-29T22:30:00Z")
    assert decide(rel, sched.plan_cycle(rel).automatic, WALL).wait == 1800
    assert sched.plan_cycle(rel).automatic is False  # the operator's: a modified replica copy does not hold it
    assert sched.schedule(rel, "v", requested=False, last_start=None, backoff=1, now=100.0,
                          wall=WALL).until == 1900.0


def test_resync_at_cancel_and_start():
    rel = Relationship(vm_id="v", role="primary", state=S.REPLICATING, seq=5, epoch="e")
    at = rs.transition(rel, rs.Resync("v", "2026-11-30T02:00:00Z"))
    assert (at.state, at.resync_at) == (S.WAITING_FOR_RESYNC, "2026-11-30T02:00:00Z")
    cancelled = rs.transition(at, rs.ResyncCancelled("v"))
    assert cancelled.resync_at is None and cancelled.resync_hold and cancelled.state == S.WAITING_FOR_RESYNC
    assert sched.schedule(cancelled, "v", requested=False, last_start=None, backoff=1, now=0.0,
                          wall=WALL).step == sched.Step.IDLE
    assert rs.transition(at, rs.ResyncStarted()).resync_at is None
    with pytest.raises(Conflict, match="no resync waiting to start"):
        rs.transition(rel, rs.ResyncCancelled("v"))
    with pytest.raises(Conflict, match="cannot be cancelled half way"):
        rs.transition(rs.transition(rel, rs.Resync("v")), rs.ResyncCancelled("v"))


def test_suspend_during_a_resync_resume_and_cancel():
    """ResynchronizeSuspended (issue 20 item 4): `suspend` during a resync, `resume` (or
    `resync`) continues it, `resync --cancel` sends it back to the operator, and a resync
    acknowledged as `suspend` came leaves replication Suspended."""
    rel = Relationship(vm_id="v", role="primary", state=S.REPLICATING, seq=5, epoch="e")
    running = rs.transition(rs.transition(rel, rs.Resync("v")), rs.ResyncStarted())
    suspended = rs.transition(running, rs.Suspend("v"))
    assert suspended.state == S.RESYNC_SUSPENDED
    assert rs.transition(suspended, rs.Suspend("v")).state == S.RESYNC_SUSPENDED
    assert sched.schedule(suspended, "v", requested=True, last_start=None, backoff=1, now=0.0,
                          wall=WALL).step == sched.Step.IDLE  # no cycle while suspended
    assert rs.transition(suspended, rs.Resume("v")).state == S.RESYNCHRONIZING
    assert rs.transition(suspended, rs.Resync("v")).state == S.RESYNCHRONIZING
    cancelled = rs.transition(dataclasses.replace(suspended, resync_progress={"segments": 3}),
                              rs.ResyncCancelled("v"))
    assert cancelled.state == S.WAITING_FOR_RESYNC and cancelled.resync_hold and not cancelled.resync_progress
    failed = rs.transition(suspended, rs.CycleFailed(rs.Failure.TRANSIENT, "link down", "t", kind=rs.CycleKind.RESYNC))
    assert failed.state == S.RESYNC_SUSPENDED  # the verb wins
    done = rs.transition(suspended, rs.CycleSucceeded(rs.CycleKind.RESYNC, 6, "t"))
    assert (done.state, done.seq) == (S.SUSPENDED, 6)
    assert rs.transition(done, rs.Resume("v")).state == S.REPLICATING

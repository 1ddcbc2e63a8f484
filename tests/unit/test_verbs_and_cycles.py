"""What a verb does to a relationship whose cycle is in flight, and what a plain
`start-initial` does after a failed `--use-existing` (replication_states.transition,
docs/design.md §5: "A verb during a cycle wins", "A plain `start-initial` abandons ...")."""

from replicad import replication_schedule as sched
from replicad import replication_states as rs
from replicad.model import Relationship
from replicad.model import ReplicationState as S
from replicad.replication_states import CycleKind, Failure

AT = "2026-11-29T12:00:00Z"


def primary(**kw) -> Relationship:
    base: dict = dict(vm_id="v", role="primary", state=S.REPLICATING, seq=4, epoch="e1")
    return Relationship(**{**base, **kw})


def test_a_plain_start_initial_after_a_failed_use_existing_copies_from_scratch() -> None:
    """A leftover seed (or export) does not win: `start-initial` is an initial copy."""
    seeded = rs.transition(primary(state=S.READY_FOR_INITIAL, seq=0), rs.Seed("vm"))
    running = rs.transition(seeded, rs.ResyncStarted())
    failed = rs.transition(running, rs.CycleFailed(Failure.PERMANENT, "no copy found there", AT))
    assert (failed.state, failed.seed) == (S.ERROR, True)
    for at in (None, "2030-01-01T00:00:00Z"):
        again = rs.transition(failed, rs.StartInitial("vm", at))
        assert (again.seed, again.awaiting_import) == (False, None)
        assert sched.plan_cycle(again).kind == CycleKind.INITIAL
    exported = rs.transition(primary(state=S.ERROR, seq=0), rs.Exported("e9", "/media"))
    failed = rs.transition(exported, rs.CycleFailed(Failure.PERMANENT, "boom", AT))
    assert rs.transition(failed, rs.StartInitial("vm")).awaiting_import is None


def test_a_verb_taken_while_a_cycle_ran_keeps_its_state() -> None:
    """The outcome of a cycle in flight is recorded, the state the verb set stays (§5)."""
    suspended = primary(state=S.SUSPENDED, seq=0, epoch="e1")
    for failure in Failure:
        out = rs.transition(suspended, rs.CycleFailed(failure, "boom", AT))
        assert out.state == S.SUSPENDED and out.error is not None and "boom" in out.error
    for state in (S.READY_FOR_INITIAL, S.WAITING_FOR_INITIAL):
        out = rs.transition(primary(state=state, seq=0), rs.CycleFailed(Failure.PERMANENT, "boom", AT))
        assert (out.state, out.error) == (state, "boom")
    acked = rs.transition(primary(state=S.SUSPENDED), rs.CycleSucceeded(CycleKind.DELTA, 5, AT,
                                                                         prepared={"seq": 5}))
    assert (acked.state, acked.seq, acked.prepared, acked.last_replication_time) == (S.SUSPENDED, 5, {}, AT)
    continued = rs.transition(suspended, rs.CycleSucceeded(CycleKind.INITIAL, 1, AT, resumed=True))
    assert (continued.state, continued.seq, continued.resync_due) == (S.SUSPENDED, 1, True)
    resumed = rs.transition(continued, rs.Resume("vm"))
    assert (resumed.state, resumed.resync_due) == (S.WAITING_FOR_RESYNC, False)  # its resync is not lost
    assert sched.plan_cycle(resumed).kind == CycleKind.RESYNC
    started = rs.transition(suspended, rs.InitialStarted("e2"))  # a retry that asked the replica first
    assert (started.state, started.epoch) == (S.SUSPENDED, "e2")
    ready = rs.transition(primary(state=S.READY_FOR_INITIAL, seq=0), rs.CycleSucceeded(CycleKind.INITIAL, 1, AT))
    assert ready.state == S.REPLICATING  # `resume`'s state for a copy with an acknowledged point

from datetime import UTC, datetime, timedelta

from replicad.health import compute
from replicad.model import Health, Relationship, Stats
from replicad.model import ReplicationState as S

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def rel(**kw):
    base = dict(vm_id="x", role="primary", state=S.REPLICATING,
                last_replication_time=(NOW - timedelta(minutes=5)).isoformat().replace("+00:00", "Z"))
    base.update(kw)
    return Relationship(**base)


def test_normal():
    assert compute(rel(), NOW) == (Health.NORMAL, [])


def test_error_is_critical():
    h, reasons = compute(rel(error="cannot reach vmhost1:80"), NOW)
    assert h == Health.CRITICAL and "cannot reach vmhost1:80" in reasons


def test_resync_is_critical():
    assert compute(rel(state=S.WAITING_FOR_RESYNC), NOW)[0] == Health.CRITICAL


def test_suspended_primary_warning_replica_critical():
    assert compute(rel(state=S.SUSPENDED), NOW)[0] == Health.WARNING
    assert compute(rel(state=S.SUSPENDED, role="replica"), NOW)[0] == Health.CRITICAL


def test_missed_cycles_over_20_percent():
    assert compute(rel(stats=Stats(successful_count=8, missed_count=2)), NOW)[0] == Health.NORMAL
    h, reasons = compute(rel(stats=Stats(successful_count=7, missed_count=3)), NOW)
    assert h == Health.WARNING and "3 of 10" in reasons[0]


def test_lag_over_an_hour():
    old = (NOW - timedelta(minutes=61)).isoformat().replace("+00:00", "Z")
    h, reasons = compute(rel(last_replication_time=old), NOW)
    assert h == Health.WARNING and "61 minutes" in reasons[0]


def test_initial_not_complete():
    assert compute(rel(state=S.READY_FOR_INITIAL, last_replication_time=None), NOW)[0] == Health.WARNING

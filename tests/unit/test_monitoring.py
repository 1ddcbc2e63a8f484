from datetime import UTC, datetime

from replicad.model import Relationship, Stats
from replicad.monitoring import interval_start, roll

T = datetime(2026, 11, 26, 10, 30, tzinfo=UTC)


def test_interval_start_anchored_at_start_time():
    assert interval_start(T, "09:00", 12 * 3600) == datetime(2026, 11, 26, 9, 0, tzinfo=UTC)
    assert interval_start(T, "11:00", 12 * 3600) == datetime(2026, 11, 25, 23, 0, tzinfo=UTC)
    assert interval_start(T, "09:00", 3600) == datetime(2026, 11, 26, 10, 0, tzinfo=UTC)


def test_roll_resets_counters_but_keeps_initial_size():
    rel = Relationship(vm_id="x", role="primary",
                       stats=Stats(monitoring_start="2026-11-26T08:00:00Z", successful_count=5, missed_count=4,
                                   initial_replication_size=123))
    assert roll(rel, "09:00", 12 * 3600, T)
    assert (rel.stats.successful_count, rel.stats.missed_count, rel.stats.initial_replication_size) == (0, 0, 123)
    assert rel.stats.monitoring_start == "2026-11-26T09:00:00Z"
    assert not roll(rel, "09:00", 12 * 3600, T)

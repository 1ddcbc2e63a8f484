"""Retention grids (retention.py) and how the replica applies them with pinned points
(replica/points.py ``retain``): zrepl's grid, anchored at the newest point, keeping the
oldest point of each interval."""

from datetime import UTC, datetime, timedelta

import pytest

from replicad.errors import UsageError
from replicad.model import Relationship
from replicad.replica.points import retain
from replicad.retention import format_grid, keep, parse_grid, sparse_terms
from replicad.times import format_time

T0 = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


def point(seq: int, second: int) -> dict:
    return {"seq": seq, "time": format_time(T0 + timedelta(seconds=second)), "consistency": "crash"}


def test_the_grid_syntax():
    assert parse_grid("1x1h | 24x1h | 7x1d | 4x1w") == [(1, 3600), (24, 3600), (7, 86400), (4, 604800)]
    assert format_grid(parse_grid("1x1h|24x60m| 7x1d")) == "1x1h | 24x1h | 7x1d"
    assert parse_grid("none") == [] and parse_grid("") == []
    for bad in ("1h", "0x1h", "1x0s", "1x1y", "2x1h |", "1001x1s", "x1h"):
        with pytest.raises(UsageError):
            parse_grid(bad)
    assert sparse_terms(parse_grid("2x1s | 3x1m | 1x1h"), 30) == ["2x1s"]


def test_each_interval_keeps_its_oldest_point_and_older_ones_go():
    grid = parse_grid("2x2s | 1x4s")  # [now-2, now), [now-4, now-2), [now-8, now-4)
    pts = [point(s, s) for s in range(1, 10)]  # seconds 1..9; the newest (10) is at now
    kept = keep(grid, T0 + timedelta(seconds=10), pts)
    assert [p["seq"] for p in kept] == [2, 6, 8]  # [2,6): 2; [6,8): 6; [8,10): 8; 1 is older than the grid
    assert [p["seq"] for p in keep(grid, T0 + timedelta(seconds=10), pts, pinned=[1, 9])] == [1, 2, 6, 8, 9]


def test_retain_applies_the_grid_at_each_commit_and_keeps_pins():
    rel = Relationship(vm_id="v", role="replica", retention="2x2s | 1x4s", applied_seq=1)
    rel.last_point_time = point(1, 1)["time"]
    for s in range(2, 16):  # a commit a second: point s made, point s-1 becomes "previous"
        previous = point(s - 1, s - 1)
        rel.applied_seq, rel.last_point_time = s, point(s, s)["time"]
        if s == 5:
            rel.pinned = [3]
        floor = retain(rel, previous, history=24, interval=3600)
        assert floor == rel.points[0]["seq"]
    # at 15: [13,15): 13; [11,13): 11; [7,11): 7 (kept since it was the oldest of its interval); pinned 3
    assert [p["seq"] for p in rel.points] == [3, 7, 11, 13]


def test_without_a_grid_pins_outlive_the_history():
    rel = Relationship(vm_id="v", role="replica", applied_seq=1, pinned=[1])
    for s in range(2, 8):
        rel.applied_seq = s
        retain(rel, point(s - 1, (s - 1) * 10), history=2, interval=5)
    assert [p["seq"] for p in rel.points] == [1, 5, 6]


def test_a_new_chain_drops_the_pins_with_the_points():
    rel = Relationship(vm_id="v", role="replica", applied_seq=5, pinned=[3], points=[point(3, 3)])
    rel.points = []  # what the commit of a resync does before retention (replica/applier.py)
    retain(rel, None, history=4, interval=1)
    assert rel.points == [] and rel.pinned == []


def test_the_newest_point_pinned_is_kept_when_the_next_one_comes():
    rel = Relationship(vm_id="v", role="replica", applied_seq=2, pinned=[2])
    rel.applied_seq = 3
    retain(rel, point(2, 2), history=1, interval=3600)  # within the interval: only the pin keeps it
    rel.applied_seq = 4
    retain(rel, point(3, 3), history=1, interval=3600)
    assert [p["seq"] for p in rel.points] == [2] and rel.pinned == [2]


def test_no_history_no_undo_logs_no_pins():
    """With a history of 0 the apply writes no undo log (replica/applier.py): a pinned
    point could not be reached, so it is not listed, and the pin goes."""
    rel = Relationship(vm_id="v", role="replica", applied_seq=3, pinned=[2], points=[point(2, 2)])
    rel.applied_seq = 4
    retain(rel, point(3, 3), history=0, interval=3600)
    assert rel.points == [] and rel.pinned == []

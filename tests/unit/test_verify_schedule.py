"""When a scheduled verify starts (primary/verify.py): its frequency after the last one
tried, moved to the window's next opening; windows may run past midnight (UTC)."""

from datetime import UTC, datetime

import pytest

from replicad.errors import UsageError
from replicad.model import Relationship
from replicad.primary.verify import next_verify
from replicad.windows import in_window, parse_window

T = datetime(2026, 11, 29, 12, 30, tzinfo=UTC)


def at(hh: int, mm: int, day: int = 29) -> datetime:
    return datetime(2026, 11, day, hh, mm, tzinfo=UTC)


def test_windows_parse_and_may_run_past_midnight():
    assert parse_window("01:00-05:30") == (60, 330)
    assert parse_window("") is None and parse_window("none") is None
    night = parse_window("22:00-02:00")
    assert night is not None
    assert in_window(night, at(23, 0)) and in_window(night, at(1, 59)) and not in_window(night, at(2, 0))
    for bad in ("1-2", "24:00-01:00", "01:00-01:00", "01:60-02:00", "01:00"):
        with pytest.raises(UsageError):
            parse_window(bad)


def test_next_verify_follows_the_frequency_and_the_window():
    rel = Relationship(vm_id="v", role="primary")
    assert next_verify(rel, T) is None  # none scheduled
    rel.verify_every = 3600
    assert next_verify(rel, T) == T  # never verified: due now
    rel.verify = {"time": "2026-11-29T12:00:00Z"}
    assert next_verify(rel, T) == at(13, 0)
    rel.verify_window = "01:00-05:00"
    assert next_verify(rel, T) == at(1, 0, day=30)  # due at 13:00, the window opens at 01:00
    rel.verify_window = "12:00-14:00"
    assert next_verify(rel, T) == at(13, 0)
    rel.verify = {"time": "2026-11-28T12:00:00Z"}  # overdue: now, in the window
    assert next_verify(rel, T) == T

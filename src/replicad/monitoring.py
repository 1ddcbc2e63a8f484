"""Monitoring intervals (SPEC §3.1, §3.4): statistics and health cover the current interval.

Intervals are anchored at ``monitoring_start_time`` (local HH:MM of the day, UTC here, as
the daemon's clock is) and last ``monitoring_interval`` seconds; when a new interval has
begun since the statistics started, they start afresh (the initial copy's size is kept)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from .model import Relationship, Stats
from .times import format_time, parse_time


def interval_start(now: datetime, start_hhmm: str, interval: int) -> datetime:
    """The start of the monitoring interval that contains ``now``."""
    hh, mm = (int(x) for x in start_hhmm.split(":"))
    anchor = now.replace(hour=hh, minute=mm, second=0, microsecond=0)
    if anchor > now:
        anchor -= timedelta(days=1)
    elapsed = (now - anchor).total_seconds()
    return anchor + timedelta(seconds=interval * int(elapsed // interval))


def roll(rel: Relationship, start_hhmm: str, interval: int, now: datetime | None = None) -> bool:
    """Start a new statistics interval when the current one is over. True when it rolled."""
    now = now or datetime.now(UTC)
    begin = interval_start(now, start_hhmm, interval)
    if rel.stats.monitoring_start and parse_time(rel.stats.monitoring_start) >= begin:
        return False
    rel.stats = Stats(monitoring_start=format_time(max(begin, now - timedelta(seconds=interval))),
                      initial_replication_size=rel.stats.initial_replication_size)
    return True

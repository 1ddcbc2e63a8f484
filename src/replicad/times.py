"""Times as replicad stores and shows them: ISO 8601, UTC, seconds, with a ``Z``."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta

# Tests only (docs/operations.md, "Testing"): REPLICAD_TEST_CLOCK_OFFSET seconds added to the
# daemon's time of day, so a window (`--resync-window`, `--verify-window`) can be opened or
# closed without waiting for the hour. Read once at start; 0 everywhere else.
TEST_CLOCK_OFFSET = timedelta(seconds=float(os.environ.get("REPLICAD_TEST_CLOCK_OFFSET") or 0))


def daemon_now() -> datetime:
    """The daemon's clock: the time of day windows and scheduled starts are judged by."""
    return datetime.now(UTC) + TEST_CLOCK_OFFSET


def format_time(t: datetime) -> str:
    return t.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def utcnow() -> str:
    return format_time(datetime.now(UTC))


def parse_time(ts: str) -> datetime:
    """Parse a stored time (or an operator's ISO 8601 input); naive times are local time."""
    t = datetime.fromisoformat(ts.replace("Z", "+00:00"))
    return t if t.tzinfo is not None else t.astimezone()

"""Times as replicad stores and shows them: ISO 8601, UTC, seconds, with a ``Z``."""

from __future__ import annotations

from datetime import UTC, datetime


def format_time(t: datetime) -> str:
    return t.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def utcnow() -> str:
    return format_time(datetime.now(UTC))


def parse_time(ts: str) -> datetime:
    """Parse a stored time (or an operator's ISO 8601 input); naive times are local time."""
    t = datetime.fromisoformat(ts.replace("Z", "+00:00"))
    return t if t.tzinfo is not None else t.astimezone()

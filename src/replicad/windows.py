"""Times of day an operator allows something in (`--verify-window`, `--resync-window`):
``HH:MM-HH:MM``, UTC, the daemon's clock (times.py ``daemon_now``). Pure functions."""

from __future__ import annotations

from datetime import datetime, timedelta

from .errors import UsageError


def parse_window(text: str) -> tuple[int, int] | None:
    """``HH:MM-HH:MM`` as (start, end) minutes of the day (UTC); '' or 'none': None. A
    window whose end is before its start runs past midnight."""
    if text.strip().lower() in ("", "none"):
        return None
    try:
        a, b = text.strip().split("-")
        minutes = []
        for part in (a, b):
            hh, mm = part.split(":")
            if not (hh.isdigit() and mm.isdigit() and len(mm) == 2 and int(hh) < 24 and int(mm) < 60):
                raise ValueError
            minutes.append(int(hh) * 60 + int(mm))
    except ValueError:
        raise UsageError(f"a window is HH:MM-HH:MM (UTC), e.g. 01:00-05:00; got {text!r}") from None
    if minutes[0] == minutes[1]:
        raise UsageError(f"the window {text!r} is empty")
    return minutes[0], minutes[1]


def in_window(window: tuple[int, int], t: datetime) -> bool:
    start, end = window
    m = t.hour * 60 + t.minute
    return start <= m < end if start < end else m >= start or m < end


def next_opening(window: tuple[int, int] | None, t: datetime) -> datetime:
    """``t`` if it is in the window (or there is none), else when the window next opens."""
    if window is None or in_window(window, t):
        return t
    opening = t.replace(hour=window[0] // 60, minute=window[0] % 60, second=0, microsecond=0)
    return opening if opening > t else opening + timedelta(days=1)

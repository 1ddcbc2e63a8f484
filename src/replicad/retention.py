"""Retention grids for recovery points (issue 20, item 2): zrepl's grid syntax.

``--retention '1x1h | 24x1h | 7x1d | 4x1w'``: N intervals of length D, newest first, laid
back to back from the newest point (the copy itself, always kept): one hour, then 24 hours
one by one, then 7 days, then 4 weeks. Each interval keeps its oldest point (so a point,
once kept, stays kept as the intervals move past it until it falls out of the last one);
a point older than the grid is pruned; a pinned point is never pruned. Pure functions: the
replica's retention (replica/points.py) and the primary's API (the warning) use them."""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import datetime, timedelta

from .errors import UsageError
from .model import Relationship
from .times import parse_time

MAX_TEXT = 256           # a grid's text, as it travels in a change-log header
MAX_POINTS = 1000        # the most points a grid may ask for (and `server set --max-recovery-history`)
MAX_SPAN = 10 * 366 * 86400
_TERM = re.compile(r"^(\d{1,4})x(\d{1,6})([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}

Grid = list[tuple[int, int]]  # (count, seconds) per term, newest first


def parse_grid(text: str) -> Grid:
    """``'1x1h | 24x1h'`` as [(1, 3600), (24, 3600)]; '' or 'none': [] (no grid)."""
    text = str(text).strip()
    if text.lower() in ("", "none"):
        return []
    if len(text) > MAX_TEXT:
        raise UsageError(f"--retention is at most {MAX_TEXT} characters")
    grid: Grid = []
    for term in text.split("|"):
        m = _TERM.match(term.strip().replace(" ", ""))
        if not m or int(m.group(1)) == 0 or int(m.group(2)) == 0:
            raise UsageError(f"--retention is intervals 'NxD' joined by '|', D a number and s, m, h, d or w "
                             f"(e.g. '1x1h | 24x1h | 7x1d | 4x1w'); got {term.strip()!r}")
        grid.append((int(m.group(1)), int(m.group(2)) * _UNITS[m.group(3)]))
    if sum(n for n, _ in grid) > MAX_POINTS or sum(n * d for n, d in grid) > MAX_SPAN:
        raise UsageError(f"--retention keeps at most {MAX_POINTS} points over at most 10 years")
    return grid


def format_grid(grid: Grid) -> str:
    def length(d: int) -> str:
        for unit in ("w", "d", "h", "m"):
            if d % _UNITS[unit] == 0:
                return f"{d // _UNITS[unit]}{unit}"
        return f"{d}s"
    return " | ".join(f"{n}x{length(d)}" for n, d in grid)


def points_asked(grid: Grid) -> int:
    return sum(n for n, _ in grid)


def history_asked(rel: Relationship) -> tuple[int, int]:
    """What a primary's logs ask the replica to keep (the header's ``history``): the grid's
    points when it has one (the grid itself travels as ``retention``), else
    ``--recovery-history`` points ``--recovery-point-interval`` apart."""
    grid = parse_grid(rel.retention) if rel.retention else []
    return (points_asked(grid) if grid else rel.recovery_history), rel.recovery_point_interval


def sparse_terms(grid: Grid, frequency: int) -> list[str]:
    """The terms whose intervals are shorter than the cycle frequency: most of them stay
    empty (a point is made per cycle), so the grid cannot be filled."""
    return [format_grid([(n, d)]) for n, d in grid if d < frequency]


def buckets(grid: Grid, now: datetime) -> list[tuple[datetime, datetime]]:
    """Each interval as [start, end), newest first, the first ending at ``now``."""
    out, end = [], now
    for n, d in grid:
        for _ in range(n):
            start = end - timedelta(seconds=d)
            out.append((start, end))
            end = start
    return out


def keep(grid: Grid, now: datetime, points: Iterable[dict], pinned: Iterable[int] = ()) -> list[dict]:
    """The points (``{"seq", "time", …}``; the newest point is at ``now``) the grid keeps,
    oldest first: the oldest in each interval, every one not older than ``now`` (captured
    in the newest point's second), and every pinned one."""
    pins = set(pinned)
    dated = sorted(((parse_time(p["time"]), p["seq"], p) for p in points), key=lambda x: (x[0], x[1]))
    kept: dict[int, dict] = {seq: p for t, seq, p in dated if seq in pins or t >= now}
    for start, end in buckets(grid, now):
        inside = [(seq, p) for t, seq, p in dated if start <= t < end]
        if inside:
            kept.setdefault(inside[0][0], inside[0][1])
    return sorted(kept.values(), key=lambda p: p["seq"])

"""Rates and durations as operators write them (40MB, 300Mbit; 30m, 12h), parsed the same
way by the API and by `replicad apply` (which compares before it changes anything)."""

from __future__ import annotations

import re

from .errors import UsageError

_RATE = re.compile(r"^(\d+(?:\.\d+)?)\s*(|b|kb|mb|gb|kib|mib|gib|kbit|mbit|gbit)$", re.I)
_RATE_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 1024, "mib": 1024**2, "gib": 1024**3,
               "kbit": 1e3 / 8, "mbit": 1e6 / 8, "gbit": 1e9 / 8}
_DURATION = re.compile(r"^(\d+)([smhd]?)$")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_rate(text) -> int:
    """Bytes per second; 0, '' and None mean no limit."""
    if text in (None, "", 0, "0"):
        return 0
    m = _RATE.match(str(text).strip())
    if not m:
        raise UsageError(f"invalid --bandwidth-limit {text!r} (examples: 40MB, 512KB, 300Mbit, 1000000)")
    return int(float(m.group(1)) * _RATE_UNITS[m.group(2).lower()])


def parse_duration(text: str) -> int:
    m = _DURATION.match(str(text).strip())
    if not m or int(m.group(1)) <= 0:
        raise UsageError(f"invalid duration {text!r} (examples: 30m, 12h, 1d, 3600)")
    return int(m.group(1)) * _DURATION_UNITS[m.group(2)]


def format_duration(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"

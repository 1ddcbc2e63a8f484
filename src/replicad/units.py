"""Rates, sizes and durations as operators write them (40MB, 300Mbit; 2TiB; 30m, 12h),
parsed the same way by the API and by `replicad apply` (which compares before it changes
anything)."""

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


_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*(|b|kb|mb|gb|tb|k|m|g|t|kib|mib|gib|tib)$", re.I)
_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
               "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_size(text, option: str) -> int | None:
    """Bytes, for a quota; 'none' (or 0) means no quota: None."""
    if text is None or str(text).strip().lower() in ("none", "0", ""):
        return None
    m = _SIZE.match(str(text).strip())
    if not m:
        raise UsageError(f"invalid {option} {text!r} (examples: 2TiB, 500GB, 64G, none)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def format_size(n: int) -> str:
    """A byte count as an operator reads it: 1 GiB, 2.5 TiB, 4096 bytes."""
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} bytes"


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

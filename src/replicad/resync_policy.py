"""When a needed resynchronization runs (issue 20 item 4; Hyper-V's
`Set-VMReplication -AutoResynchronizeEnabled -AutoResynchronizeIntervalStart/End` and
`Resume-VMReplication -Resynchronize -ResynchronizeStartTime`). Pure: the primary's
supervisor asks it (replication_states.schedule) with the daemon's time of day.

- A resync the operator scheduled (`replication resync VM --at TIME`) runs at that time,
  whatever the automatic setting says.
- A resync the engine found needed (a gap, a lost baseline, a refused log) runs as
  `--auto-resync` says: ``on`` at once, ``off`` never by itself (the relationship waits
  in WaitingForStartResynchronize for `replication resync`), ``window`` only while
  `--resync-window HH:MM-HH:MM` (UTC) is open — outside it, it waits for the opening.
- One the operator cancelled (`replication resync VM --cancel`) is held like ``off``.
- The operator's `replication resync` (no `--at`) always runs at once."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from .errors import UsageError
from .model import Relationship
from .times import parse_time
from .windows import next_opening, parse_window

AUTO_RESYNC = ("on", "off", "window")


def parse_auto(text: str) -> str:
    value = str(text).strip().lower()
    if value not in AUTO_RESYNC:
        raise UsageError(f"--auto-resync is on, off or window; got {text!r}")
    return value


@dataclass(frozen=True)
class Decision:
    wait: float | None = None   # seconds until it may run (0: now)
    idle: str | None = None     # why it waits for the operator instead


def decide(rel: Relationship, automatic: bool, wall: datetime) -> Decision:
    """Whether a resync of ``rel`` (WaitingForStartResynchronize) runs now, later, or waits
    for the operator. ``automatic``: the engine's own (replication_states.plan_cycle)."""
    if rel.resync_at:
        return Decision(wait=max(0.0, (parse_time(rel.resync_at) - wall).total_seconds()))
    if not automatic:
        return Decision(wait=0.0)
    if rel.auto_resync == "off":
        return Decision(idle="automatic resynchronization is off (`replication set --auto-resync`); "
                             "`replication resync` starts it")
    if rel.auto_resync == "window":
        window = parse_window(rel.resync_window)
        return Decision(wait=(next_opening(window, wall) - wall).total_seconds())
    return Decision(wait=0.0)

"""Recovery points on the replica (SPEC §3.4 `--recovery-history`, `--recovery-point-interval`).

The latest committed point is the copy itself. Older points are kept as a chain of undo
logs: undo log k turns point k back into point k-1, so any retained point p is the copy
with undo logs latest..p+1 applied in reverse order. Retention keeps at most N older
points, at least one interval apart; every undo log above the oldest retained point is
kept (the chain must be whole), everything at or below it is deleted. The point the next
cycle builds on is the latest, which is never pruned."""

from __future__ import annotations

import os
from pathlib import Path

from ..model import Relationship, ReplicationState
from ..times import parse_time
from .apply import apply_records
from .layout import VMDir


def retain(rel: Relationship, previous: dict | None, history: int, interval: int) -> int:
    """Update ``rel.points`` after a commit (``previous`` was the latest point before it).
    Returns the floor: undo logs at or below it are no longer needed."""
    points = list(rel.points) if history else []
    if history and previous is not None and previous["seq"] > 0:
        if not points or (parse_time(previous["time"]) - parse_time(points[-1]["time"])).total_seconds() >= interval:
            points.append(previous)
    points = points[-history:] if history else []
    rel.points = points
    return points[0]["seq"] if points else rel.applied_seq


def drop_undo(vmdir: VMDir, floor: int) -> None:
    """Delete the undo logs at or below ``floor`` (they lead past the oldest kept point)."""
    if not vmdir.undo.exists():
        return
    for p in vmdir.undo.iterdir():
        if p.name[:12].isdigit() and int(p.name[:12]) <= floor and not p.name.endswith(".part"):
            p.unlink(missing_ok=True)


def available(rel: Relationship) -> list[dict]:
    """The points a failover can use: none once a failover is completed (the copy is the VM's
    own now) or while the copy is not known to be its newest point (after a reverse that must
    resync it); otherwise the kept points and the newest. A point's time is its capture's."""
    if rel.applied_seq == 0 or rel.copy_unverified or rel.state == ReplicationState.FAILED_OVER:
        return []
    latest = {"seq": rel.applied_seq, "time": rel.last_point_time or rel.last_replication_time,
              "consistency": rel.last_consistency}
    return list(rel.points) + [latest]


def chain(vmdir: VMDir, rel: Relationship, point: int) -> list[Path]:
    """The undo logs that take the latest point back to ``point`` (newest first)."""
    logs = [vmdir.undo_log(s) for s in range(rel.applied_seq, point, -1)]
    missing = [p.name for p in logs if not p.exists()]
    if missing:
        raise FileNotFoundError(f"undo logs missing for recovery point {point}: {', '.join(missing[:3])}")
    return logs


def undo_bytes(vmdir: VMDir, rel: Relationship, point: int) -> int:
    return sum(os.stat(p).st_size for p in chain(vmdir, rel, point))


def roll_back(logs: list[Path], disks: list[Path]) -> None:
    """Apply undo logs newest first: the disks end at the chosen (older) point."""
    for undo in logs:
        apply_records(undo, disks)

"""Recovery points on the replica (SPEC §3.4 `--recovery-history`, `--recovery-point-interval`;
issue 20: `--retention` grids and pinned points).

The latest committed point is the copy itself. Older points are kept as a chain of undo
logs: undo log k turns point k back into point k-1, so any retained point p is the copy
with undo logs latest..p+1 applied in reverse order. Retention keeps at most N older
points, at least one interval apart — or, with a retention grid (``rel.retention``, as the
primary's logs ask), the points the grid keeps (retention.py); pinned points
(``rel.pinned``, `replication pin-point`) are kept either way. Every undo log above the
oldest retained point is kept (the chain must be whole), everything at or below it is
deleted. The point the next cycle builds on is the latest, which is never pruned."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from .. import log as logmod
from .. import retention
from ..model import Relationship, ReplicationState
from ..times import parse_time
from .apply import apply_records, read_header
from .layout import VMDir

log = logmod.get("replicad.replica")


def retain(rel: Relationship, previous: dict | None, history: int, interval: int) -> int:
    """Update ``rel.points`` after a commit (``previous`` was the latest point before it).
    Returns the floor: undo logs at or below it are no longer needed. With a retention grid
    (``rel.retention``) the grid decides, else ``history`` points ``interval`` apart; pinned
    points (``rel.pinned``) are kept either way, beyond ``history`` — as long as ``history``
    is not 0: then no undo log was written for this commit (replica/applier.py), so no older
    point, pinned or not, can be reached any more."""
    pins = set(rel.pinned) if history else set()
    candidates = list(rel.points)
    fresh = previous is not None and previous["seq"] > 0
    grid = retention.parse_grid(rel.retention) if rel.retention else []
    if grid and rel.last_point_time:
        kept = retention.keep(grid, parse_time(rel.last_point_time),
                              candidates + ([previous] if fresh and previous else []), pins)
    else:
        kept = candidates
        if fresh and previous is not None and (previous["seq"] in pins or history and (not candidates or (
                parse_time(previous["time"]) - parse_time(candidates[-1]["time"])).total_seconds() >= interval)):
            kept = candidates + [previous]
    unpinned = [p for p in kept if p["seq"] not in pins]
    unpinned = unpinned[-history:] if history else []  # the newest `history` (the server's cap with a grid)
    rel.points = sorted([p for p in kept if p["seq"] in pins] + unpinned, key=lambda p: p["seq"])
    gone = [s for s in rel.pinned if s != rel.applied_seq and all(p["seq"] != s for p in rel.points)]
    if gone:
        log.warning("recovery.pins_dropped", vm_id=rel.vm_id, points=gone,
                    reason="a resync or an initial copy replaced the copy (the points before it are gone)"
                    if history else "this VM keeps no recovery points any more (its primary asks for none, or "
                    "`server set --max-recovery-history` is 0): no undo log leads back to them")
        rel.pinned = [s for s in rel.pinned if s not in gone]
    return rel.points[0]["seq"] if rel.points else rel.applied_seq


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
              "consistency": rel.last_consistency, **({"group": rel.last_group} if rel.last_group else {})}
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


def roll_back(logs: list[Path], files: dict[str, Path], place: Callable[[str], Path]) -> dict[str, Path]:
    """Apply undo logs newest first to ``files`` (a file's name in the copy -> the file to
    roll back): they end at the chosen (older) point. An undo log names its point's whole
    file set (replica/disk_set.py): a file it does not name is deleted, one it names and
    ``files`` lacks is made at ``place(name)`` (a disk removed since that point, its bytes
    all in the undo log). Returns the point's files, in its order."""
    files = dict(files)
    for undo in logs:
        names = [d.name for d in read_header(undo).disks]
        paths = [files.get(n) or place(n) for n in names]
        apply_records(undo, paths, added=[i for i, n in enumerate(names) if n not in files])
        for n, p in files.items():
            if n not in names:
                p.unlink(missing_ok=True)
        files = dict(zip(names, paths, strict=True))
    return files

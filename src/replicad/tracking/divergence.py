"""Which side moved: compare three sets of digest maps block by block.

``base`` is the point both copies last agreed on (the primary's baseline for the replica's
applied point), ``replica`` the replica copy as it is now, ``primary`` the primary's disks as
the resync read them. A block that differs from the base on the replica was changed there
outside replicad (a failed-over VM that wrote, a hand edit, a restore); one that differs on
the primary is ordinary new data. Maps only are read: 8 bytes per 4 KiB block."""

from __future__ import annotations

from array import array
from dataclasses import asdict, dataclass
from pathlib import Path

from .digestmap import DigestMapReader

STEP = 1 << 16  # blocks compared per slice: 512 KiB of each map


@dataclass
class Divergence:
    primary_moved: int = 0   # blocks the primary changed since the common point
    replica_moved: int = 0   # blocks the replica copy changed since the common point
    both_moved: int = 0      # blocks changed on both sides (the replica's version is lost by a resync)
    differing: int = 0       # blocks that differ between the two copies now

    def to_json(self) -> dict[str, int]:
        return asdict(self)


def _slices(readers: list[DigestMapReader | None], first: int, count: int) -> list[array[int]]:
    out = []
    for r in readers:
        a = r.slice(first, count) if r is not None else array("Q")
        a.extend([0] * (count - len(a)))  # past a map's end: never equal to a real block's digest here
        out.append(a)
    return out


def _open(paths: list[Path] | None, n: int) -> list[DigestMapReader | None]:
    if paths is None:
        return [None] * n
    return [DigestMapReader.open(p) for p in paths]


def compare(replica: list[Path], primary: list[Path], base: list[Path] | None = None) -> Divergence | None:
    """The divergence between two copies, and (with ``base``) which side moved. ``primary``
    may be None-free but shorter lists are refused: None when the maps do not line up."""
    if len(replica) != len(primary) or (base is not None and len(base) != len(replica)):
        return None
    groups = [_open(replica, len(replica)), _open(primary, len(primary)), _open(base, len(replica))]
    try:
        if any(r is None for r in groups[0] + groups[1]) or (base is not None and any(r is None for r in groups[2])):
            return None
        d = Divergence()
        for i in range(len(replica)):
            disk = [g[i] for g in groups]
            blocks = max(r.blocks for r in disk if r is not None)
            for first in range(0, blocks, STEP):
                count = min(STEP, blocks - first)
                rep, pri, bas = _slices(disk, first, count)
                if rep == pri and (base is None or rep == bas):
                    continue
                for j in range(count):
                    if rep[j] != pri[j]:
                        d.differing += 1
                    if base is not None:
                        r_moved, p_moved = rep[j] != bas[j], pri[j] != bas[j]
                        d.replica_moved += r_moved
                        d.primary_moved += p_moved
                        d.both_moved += r_moved and p_moved
        return d
    finally:
        for g in groups:
            for r in g:
                if r is not None:
                    r.close()


def replica_moved(replica: list[Path], base: list[Path]) -> int | None:
    """Blocks of the replica copy that differ from the common point (None: cannot tell)."""
    d = compare(replica, base, base)
    return None if d is None else d.differing

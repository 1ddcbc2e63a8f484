"""Which side moved: compare three sets of digest maps block by block.

``base`` is the point both copies last agreed on (the primary's baseline for the replica's
applied point), ``replica`` the replica copy as it is now, ``primary`` the primary's disks as
the resync read them. A block that differs from the base on the replica was changed there
outside replicad (a failed-over VM that wrote, a hand edit, a restore); one that differs on
the primary is ordinary new data. Maps only are read: 8 bytes per 4 KiB block."""

from __future__ import annotations

from array import array
from collections.abc import Iterator
from contextlib import contextmanager
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


@contextmanager
def _opened(*paths: list[Path] | None, n: int) -> Iterator[list[list[DigestMapReader | None]] | None]:
    """Readers of each list of maps (None-lists give Nones), closed on exit; None when a
    map that was asked for is missing or damaged."""
    groups = [_open(p, n) for p in paths]
    try:
        complete = all(r is not None for g, p in zip(groups, paths, strict=True) if p is not None for r in g)
        yield groups if complete else None
    finally:
        for g in groups:
            for r in g:
                if r is not None:
                    r.close()


def compare(replica: list[Path], primary: list[Path], base: list[Path] | None = None) -> Divergence | None:
    """The divergence between two copies, and (with ``base``) which side moved. ``primary``
    may be None-free but shorter lists are refused: None when the maps do not line up."""
    if len(replica) != len(primary) or (base is not None and len(base) != len(replica)):
        return None
    with _opened(replica, primary, base, n=len(replica)) as groups:
        if groups is None:
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


def replica_moved(replica: list[Path], base: list[Path]) -> int | None:
    """Blocks of the replica copy that differ from the common point (None: cannot tell)."""
    d = compare(replica, base, base)
    return None if d is None else d.differing


@dataclass
class Mismatches:
    """Where two copies of the same point differ (a verify): per file, runs of differing
    4 KiB blocks as [first, last] (inclusive), and how many blocks were compared."""

    compared: int
    runs: list[list[list[int]]]

    @property
    def blocks(self) -> int:
        return sum(last - first + 1 for disk in self.runs for first, last in disk)


def mismatches(replica: list[Path], expected: list[Path]) -> Mismatches | None:
    """The blocks where ``replica``'s maps differ from ``expected``'s (a copy that should
    hold exactly the expected point); None when the maps do not line up."""
    if len(replica) != len(expected):
        return None
    with _opened(replica, expected, n=len(replica)) as groups:
        if groups is None:
            return None
        out = Mismatches(0, [])
        for rep_map, exp_map in zip(*groups, strict=True):
            blocks = max(r.blocks for r in (rep_map, exp_map) if r is not None)
            out.compared += blocks
            runs: list[list[int]] = []
            for first in range(0, blocks, STEP):
                count = min(STEP, blocks - first)
                rep, exp = _slices([rep_map, exp_map], first, count)
                if rep == exp:
                    continue
                for j in (j for j in range(count) if rep[j] != exp[j]):
                    if runs and runs[-1][1] == first + j - 1:
                        runs[-1][1] += 1
                    else:
                        runs.append([first + j, first + j])
            out.runs.append(runs)
        return out


def named(files: list[str], found: Mismatches, limit: int) -> list[dict[str, object]]:
    """The differing runs by file name (``{"file", "blocks": [[first, last], …]}``), at most
    ``limit`` runs in all (the count, ``found.blocks``, is always whole)."""
    out: list[dict[str, object]] = []
    left = limit
    for name, runs in zip(files, found.runs, strict=True):
        if runs and left > 0:
            out.append({"file": name, "blocks": runs[:left]})
            left -= len(runs[:left])
    return out

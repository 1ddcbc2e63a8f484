"""Baselines: one folder of digest maps per acknowledged cycle — what the primary's scan
compares against, and what a failed-over replica builds before it reverses (the
common point's maps, ``build_baseline``). Both roles use it, so it lives here.

``maps/<vm-id>/<seq>/disk<i>.map`` is the state of the disks as shipped in log ``seq``.
The catalog's ``relationship.seq`` says which folder is the baseline; a folder above it is
*pending* (sealed before its log's trailer was sent, so a crash between the replica's ack
and the catalog commit loses nothing: the next cycle asks the replica and promotes it).
Folders ending in ``.tmp`` are cycles that never finished and are dropped."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..fsutil import durable_rename, fsync_dir, fsync_file
from .digestmap import DigestMapReader
from .scan import digest_disks


class Baselines:
    def __init__(self, state_dir: Path, vm_id: str):
        self.root = state_dir / "maps" / vm_id

    def dir(self, seq: int) -> Path:
        return self.root / f"{seq:012d}"

    def tmp(self, seq: int) -> Path:
        return self.root / f"{seq:012d}.tmp"

    @staticmethod
    def map_name(index: int) -> str:
        return f"disk{index}.map"

    def begin(self, seq: int) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        t = self.tmp(seq)
        shutil.rmtree(t, ignore_errors=True)
        t.mkdir()
        return t

    def seal(self, seq: int) -> None:
        """Make cycle ``seq``'s maps durable as pending (before its trailer goes out)."""
        t = self.tmp(seq)
        for p in t.iterdir():
            fsync_file(p)
        fsync_dir(t)
        shutil.rmtree(self.dir(seq), ignore_errors=True)
        durable_rename(t, self.dir(seq))

    def readers(self, seq: int, ndisks: int) -> list[DigestMapReader] | None:
        """The maps of baseline ``seq``; None when any is missing or damaged."""
        out: list[DigestMapReader] = []
        for i in range(ndisks):
            r = DigestMapReader.open(self.dir(seq) / self.map_name(i))
            if r is None:
                for x in out:
                    x.close()
                return None
            out.append(r)
        return out

    def sealed(self) -> list[int]:
        if not self.root.exists():
            return []
        return sorted(int(p.name) for p in self.root.iterdir() if p.name.isdigit())

    def keep_only(self, seq: int) -> None:
        """After the catalog committed ``seq``: everything else is garbage."""
        if not self.root.exists():
            return
        for p in self.root.iterdir():
            if p.name != f"{seq:012d}":
                shutil.rmtree(p, ignore_errors=True)

    def drop_all(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def drop_unsealed(self) -> None:
        if self.root.exists():
            for p in self.root.glob("*.tmp"):
                shutil.rmtree(p, ignore_errors=True)


def build_baseline(state_dir: Path, vm_id: str, seq: int, disks: list[Path]) -> None:
    """The digest maps of these disks as they are now, sealed as baseline ``seq``: how a new
    primary (after `reverse`) knows what its partner holds without any transfer."""
    b = Baselines(state_dir, vm_id)
    b.drop_all()
    digest_disks(disks, b.begin(seq), Baselines.map_name)
    b.seal(seq)

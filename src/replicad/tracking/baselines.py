"""Baselines: one folder of digest maps per acknowledged cycle — what the primary's scan
compares against, and what a failed-over replica builds before it reverses (the
common point's maps, ``build_baseline``). Both roles use it, so it lives here.

``maps/<vm-id>/<seq>/disk<i>.map`` is the state of the disks as shipped in log ``seq``.
The catalog's ``relationship.seq`` says which folder is the baseline; a folder above it is
*pending* (sealed before its log's trailer was sent, so a crash between the replica's ack
and the catalog commit loses nothing: the next cycle asks the replica and promotes it).
Folders ending in ``.tmp`` are cycles that never finished and are dropped. A folder's
``files`` names the file each map is of, one per line in map order: a VM's disk set may
change between cycles (`vm set --add-disk/--remove-disk`, issue 20), and a map is found
by its file's name, never by a position that moved (a folder without it is positional)."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
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

    FILES = "files"

    def begin(self, seq: int, names: Sequence[str] = ()) -> Path:
        """The folder cycle ``seq``'s maps are written to; ``names``: the files they are of."""
        self.root.mkdir(parents=True, exist_ok=True)
        t = self.tmp(seq)
        shutil.rmtree(t, ignore_errors=True)
        t.mkdir()
        if names:
            (t / self.FILES).write_text("".join(n + "\n" for n in names))
        return t

    def seal(self, seq: int) -> None:
        """Make cycle ``seq``'s maps durable as pending (before its trailer goes out)."""
        t = self.tmp(seq)
        for p in t.iterdir():
            fsync_file(p)
        fsync_dir(t)
        shutil.rmtree(self.dir(seq), ignore_errors=True)
        durable_rename(t, self.dir(seq))

    def readers(self, seq: int, names: Sequence[str]) -> list[DigestMapReader | None] | None:
        """The maps of baseline ``seq`` for the files ``names``, found by name: None for a file
        the baseline does not know (a disk added since: all of it is a change); None in all
        when a map the baseline lists is missing or damaged, or a positional folder (one
        written before maps were named) has another number of maps."""
        try:
            listed = (self.dir(seq) / self.FILES).read_text().splitlines()
        except FileNotFoundError:
            listed = None
        except OSError:
            return None
        if listed is None:
            count = sum(1 for p in self.dir(seq).glob("disk*.map")) if self.dir(seq).is_dir() else -1
            if count != len(names):
                return None
            listed = list(names)
        out: list[DigestMapReader | None] = []
        for name in names:
            if name not in listed:
                out.append(None)
                continue
            r = DigestMapReader.open(self.dir(seq) / self.map_name(listed.index(name)))
            if r is None:
                for x in out:
                    if x is not None:
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
    digest_disks(disks, b.begin(seq, [p.name for p in disks]), Baselines.map_name)
    b.seal(seq)

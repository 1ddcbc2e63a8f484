"""The failed-over copy (SPEC §3.5, design.md §6): a failover never rolls the replica copy
back in place, so every listed recovery point keeps its bytes until `complete`.

The failed-over VM runs on its own copy of the chosen point, made beside each of its files
(a reflink clone where the filesystem can, a sparse copy otherwise) and rolled back with
the undo chain; it takes the file's name, so the VM's paths never change. The replica copy
(the newest point) is set aside under another name in the same folder — a rename, nothing
is copied — and with its undo chain it keeps every point: a test failover or a move to
another point is made from it, and `failover stop` renames it back.

For each of a VM's files ``p``:
  p                          the VM's file: the replica copy, or while failed over the failover copy
  .<name>.replicad-held      while failed over: the replica copy, at the newest point
  .<name>.replicad-next      a failover copy being made, or made and not yet in place

Crash order — the catalog is the truth, and ``settle`` makes the files agree with it:
  start:    make next (clone, roll back, fsync) → catalog FailedOverWaitingCompletion with the
            identities of next → p→held, next→p
  move:     make next from held → catalog (new point, identities of next) → next→p
  stop:     catalog Replicating → held→p (the failover copy is dropped)
  complete: catalog FailedOver (or the VM became a primary by reverse) → held deleted
``settle(files, waiting, expected)``, at daemon start and at the end of every step:
  not failed over (``waiting`` None): a held file goes back to p; next files are deleted;
  waiting: a next file with the recorded identity goes to p (p first to held, if held is
    missing); any other next file is deleted;
  completed or primary: held and next files are deleted.
A point may have another disk set than the newest (issue 20: disks added or removed in
between, replica/disk_set.py): while failed over, a disk only the newest point has is held
(and no file of that name is the VM's), one only the failover point has is the failover
copy alone (nothing to hold, deleted when the failover is cancelled); the catalog's VM
lists the point's disks, its relationship's ``failover["newest"]`` the replica copy's.
Every step is a rename or a delete and each is idempotent, so a crash anywhere resumes or
undoes at start. Blocking code: runs in worker threads."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from ..fsutil import fsync_dir
from ..tracking.digestmap import identities
from .failover import clone_or_copy
from .points import roll_back

Fault = Callable[[str], None]
NOT_FAILED_OVER, WAITING, COMPLETED = "not-failed-over", "waiting", "completed"


def held(p: Path) -> Path:
    """Where the replica copy of file ``p`` waits while the VM is failed over."""
    return p.with_name(f".{p.name}.replicad-held")


def upcoming(p: Path) -> Path:
    """Where a failover copy of file ``p`` is made before it takes p's name."""
    return p.with_name(f".{p.name}.replicad-next")


def sources(files: list[Path], waiting: bool) -> list[Path]:
    """Where the replica copy is now: the files themselves, or their held copies."""
    return [held(p) for p in files] if waiting else list(files)


def make(files: list[Path], waiting: bool, undo_logs: list[Path], place: Callable[[str], Path],
         fault: Fault = lambda at: None) -> tuple[str, list, list[Path]]:
    """Make the failover copy of the point that ``undo_logs`` (newest first) lead to from
    the replica copy (``files``, the newest point's), under the ``upcoming`` names; durable
    on return. The point may have other files than the newest (`vm set --add-disk/
    --remove-disk` in between, replica/disk_set.py): ``place(name)`` is where the VM keeps
    a file of that name. Returns how it was copied ("reflink" or "sparse copy"), the
    identities of the point's files (what the catalog records) and the point's files."""
    nxt = {p.name: upcoming(p) for p in files}
    kinds = set()
    for src, dst in zip(sources(files, waiting), nxt.values(), strict=True):
        kinds.add(clone_or_copy(src, dst))
        fault("failover-copying")
    made = roll_back(undo_logs, nxt, lambda name: upcoming(place(name)))  # apply_records fsyncs what it wrote
    for folder in {p.parent for p in nxt.values()} | {p.parent for p in made.values()}:
        fsync_dir(folder)
    fault("failover-made")
    return ("reflink" if kinds == {"reflink"} else "sparse copy"), identities(list(made.values())), \
        [place(n) for n in made]


def settle(files: list[Path], state: str, expected: list | None = None, fault: Fault = lambda at: None,
           newest: list[Path] | None = None, stale: Sequence[Path] = ()) -> list[str]:
    """Make the files agree with the catalog's ``state`` (see the module's doc). ``files``:
    the VM's files (while failed over, the failover point's); ``newest``: the replica copy's,
    where they differ (a disk added or removed since the point); ``stale``: the files of a
    point the VM was failed over to before (a move). ``expected``: the failover copy's
    recorded identities while ``state`` is WAITING. Returns what it did."""
    newest = files if newest is None else newest
    point, replica = set(files), set(newest)
    done: list[str] = []
    for p in list(dict.fromkeys([*files, *newest, *stale])):
        h, n = held(p), upcoming(p)
        if state == NOT_FAILED_OVER:
            if p in replica and h.exists():
                os.replace(h, p)
                done.append(f"{p.name}: the replica copy is back")
            elif p not in replica and p.exists():
                p.unlink()
                done.append(f"{p.name}: the failover copy of a disk the replica copy does not have is deleted")
        elif state == WAITING:
            if p in point:
                ident = expected[files.index(p)] if expected is not None else None
                if n.exists() and ident is not None and identities([n]) == [ident]:
                    if p in replica and not h.exists():
                        os.replace(p, h)
                        fault("failover-held")
                    os.replace(n, p)
                    done.append(f"{p.name}: the failover copy is in place")
            elif p in replica:
                if not h.exists() and p.exists():
                    os.replace(p, h)
                    done.append(f"{p.name}: the replica copy is set aside (the point has no such disk)")
                elif h.exists() and p.exists():
                    p.unlink()
            elif p.exists():
                p.unlink()
                done.append(f"{p.name}: the failover copy of another point is deleted")
        else:
            if h.exists():
                h.unlink()
                done.append(f"{p.name}: the replica copy of the dropped points is deleted")
        for leftover in (n, n.with_name(n.name + ".part")):
            if leftover.exists():
                leftover.unlink()
                done.append(f"{leftover.name}: an unfinished failover copy is deleted")
        fault("failover-settling")
    for folder in {p.parent for p in [*files, *newest]}:
        if folder.exists():
            fsync_dir(folder)
    return done

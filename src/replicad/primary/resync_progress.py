"""Where a segmented resync is (primary/resync_segments.py), kept across a `suspend` and a
restart in ``<state>/resync/<vm-id>/view/segments.json``, inside the view it describes:

- ``replica/``: the replica's digests as fetched when the resync began (the divergence
  report compares them at the end);
- ``view/``: those digests with every range already sent replaced by the digests of what
  was sent — what the replica's copy will hold once its staged segments are applied;
- ``base/``: this primary's maps of the common point, when it still had them.

``segments.json`` lives in ``view/`` so that a segment's new view and the count that says
it was sent are replaced by one rename: were they two steps, a crash (or a full disk)
between them would leave a view holding segment *k* with a count that says it is unsent,
and segment *k* would be sent again as "no difference" and replace the staged one on the
replica — the copy silently missing that range.

A resync continues only when the replica still holds the segments this file says it sent
(its status answer), for the same resync, on the same point; otherwise it starts over."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..fsutil import fsync_dir, write_atomic
from ..tracking.digestmap import FileIdentity, restamp
from ..tracking.scan import racy_guard

FILE = "segments.json"


@dataclass
class SegmentsSent:
    id: str          # 16 hex digits: the replica's staged segments are filed under it
    epoch: str       # the epoch the resync starts
    seq: int         # the point the resync makes
    base_seq: int    # the replica's applied point it builds on
    names: list[str]  # the VM's files, in order
    replica: list[str]  # the fetched maps' names in replica/
    disk: int = 0    # where the next segment starts
    offset: int = 0
    sent: int = 0    # segments the replica has staged
    of: int = 0      # segments planned (the disks' sizes when it began)
    bytes: int = 0   # log bytes sent in them
    # each file's identity (size, mtime, ctime, inode, device) before the first segment read it
    # (ctime 0 when it was written too recently to tell: tracking/scan.py racy_guard)
    identities: list[list[int]] = field(default_factory=list)

    def summary(self) -> dict:
        """What `replication get` shows (``resync_progress``)."""
        return {"segments": self.sent, "of": self.of, "bytes_sent": self.bytes}


def load(work: Path) -> SegmentsSent | None:
    """The resync under way in ``work``, or None (none, or a file this version cannot read)."""
    try:
        doc = json.loads((work / "view" / FILE).read_bytes())
        got = SegmentsSent(**doc)
    except (OSError, ValueError, TypeError):
        return None
    ints = (got.seq, got.base_seq, got.disk, got.offset, got.sent, got.of, got.bytes)
    if not all(isinstance(v, int) and v >= 0 for v in ints) or not isinstance(got.id, str):
        return None
    if not all((work / "replica" / n).is_file() for n in got.replica) or \
            not all(p.is_file() for p in view_maps(work, got)):
        return None
    return got


def save(work: Path, got: SegmentsSent, folder: str = "view") -> None:
    write_atomic(work / folder / FILE, json.dumps(asdict(got)).encode(), 0o600)


def view_maps(work: Path, got: SegmentsSent) -> list[Path]:
    return [work / "view" / f"{i}.map" for i in range(len(got.names))]


def start_view(work: Path, replica_maps: list[Path]) -> None:
    """The view begins as the replica's own digests (links: a view map is replaced whole,
    never written in place)."""
    view = work / "view"
    shutil.rmtree(view, ignore_errors=True)
    view.mkdir(parents=True)
    for i, p in enumerate(replica_maps):
        os.link(p, view / f"{i}.map")


def advance_view(work: Path, got: SegmentsSent) -> None:
    """The segment's new maps (``next/``) are the view now, with ``got`` (which counts the
    segment as sent) in it: the replica staged it. One rename makes both count; a crash
    before it leaves the old view with the old count (the segment is sent again, whole)."""
    view, new, old = work / "view", work / "next", work / "view.old"
    save(work, got, "next")
    fsync_dir(new)  # the links of the disks it did not read, and segments.json
    shutil.rmtree(old, ignore_errors=True)
    os.rename(view, old)
    os.rename(new, view)
    fsync_dir(work)
    shutil.rmtree(old, ignore_errors=True)


def continuable(got: SegmentsSent | None, status: dict) -> bool:
    """Whether the replica (its status answer) holds this resync's segments as sent: the
    same resync on the same applied point, every segment acknowledged — and perhaps the
    next, staged before its acknowledgement was lost (it is sent again)."""
    held = status.get("segments")
    if got is None or not isinstance(held, dict) or not status.get("exists"):
        return False
    return (held.get("id") == got.id and held.get("seq") == got.seq and held.get("base_seq") == got.base_seq
            and status.get("applied_seq") == got.base_seq == status.get("acked_seq")
            and held.get("held") in (got.sent, got.sent + 1))


def identities_now(files: list[Path]) -> list[list[int]]:
    """The files' identities as a resync begins (racily recent ones recorded with ctime 0)."""
    now = time.time_ns()
    out = []
    for p in files:
        i = racy_guard(FileIdentity.of(os.stat(p)), now)
        out.append([i.size, i.mtime_ns, i.ctime_ns, i.ino, i.dev])
    return out


def stamp_unchanged(work: Path, got: SegmentsSent, files: list[Path]) -> list[int]:
    """Before the closing scan: a file not written since the resync began was read, range by
    range, as it is now, so its view map is its digests — that map gets the file's identity
    and the closing scan takes the file as unchanged instead of reading it whole again (a VM
    that is off: the disks are read once, as by an unsegmented resync). Returns those files."""
    out = []
    for i, p in enumerate(files):
        if i >= len(got.identities) or len(got.identities[i]) != 5:
            continue
        then = FileIdentity(*got.identities[i])
        if then.ctime_ns == 0 or FileIdentity.of(os.stat(p)) != then:
            continue
        view = view_maps(work, got)[i]
        fresh = view.with_name(view.name + ".stamped")
        shutil.copyfile(view, fresh)  # never in place: the file may be a link of an older view
        if restamp(fresh, then):
            os.replace(fresh, view)
            out.append(i)
        else:
            fresh.unlink()
    if out:
        fsync_dir(work / "view")
    return out

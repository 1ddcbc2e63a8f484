"""A segmented resync's segments on the replica (primary/resync_segments.py; docs/design.md
§2): each one verified and staged durably in ``<vm>/segments/`` and acknowledged, never
applied on its own — the copy stays at its last point, whatever a failover or a crash finds.
The last (closing) segment puts them all together, in order, into the one staged log of the
resync's point (``logs/<seq>.log``), which the applier applies as any log: undo, atomic.

A segment header is untrusted: its id must be the staged resync's (``meta.json``: id, epoch,
point, base, peer, file names, and the copy's identity when the first segment came), its
index the next one or the last one again (an acknowledgement that was lost), its records
within the header's disks (the decoder) and, put together, within the final sizes (cut
there). A copy written since the first segment, or more staged than four copies' worth,
drops them all: the primary starts over. A log that is no segment (a delta, an unsegmented
resync) drops them too, as does `resync --cancel` (``discard``) and removing the copy."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

from ..errors import ResyncRequired, WireError
from ..fsutil import durable_rename, fsync_dir, write_atomic
from ..tracking.digestmap import identities
from ..wire import RECORD_DATA, RECORD_RESIZE, Header, LogDecoder, LogEncoder, Record, Trailer
from .apply import read_header, read_log
from .layout import VMDir
from .staging import Staging

META = "meta.json"
SLACK = 1 << 30  # staged bytes allowed beyond four copies' worth


def folder(vmdir: VMDir) -> Path:
    return vmdir.root / "segments"


def _path(vmdir: VMDir, k: int) -> Path:
    return folder(vmdir) / f"{k:07d}.log"


def _meta(vmdir: VMDir) -> dict | None:
    try:
        doc = json.loads((folder(vmdir) / META).read_bytes())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _count(vmdir: VMDir) -> int:
    """Segments staged: those from 0 on, with no gap."""
    k = 0
    while _path(vmdir, k).is_file():
        k += 1
    return k


def held(vmdir: VMDir, peer: str) -> dict | None:
    """What the primary's status asks (only the peer that sent them): the resync staged here."""
    meta = _meta(vmdir)
    if meta is None or meta.get("peer") != peer:
        return None
    return {"id": meta.get("id"), "seq": meta.get("seq"), "base_seq": meta.get("base_seq"), "held": _count(vmdir)}


def discard(vmdir: VMDir, peer: str | None = None) -> int:
    """Drop the staged segments (only ``peer``'s, when given); how many there were."""
    if not folder(vmdir).exists():
        return 0
    meta = _meta(vmdir)
    if peer is not None and meta is not None and meta.get("peer") != peer:
        return 0
    n = _count(vmdir)
    shutil.rmtree(folder(vmdir), ignore_errors=True)
    fsync_dir(vmdir.root)
    return n


def open_staging(vmdir: VMDir, header: Header, peer: str, copy: list[Path], decoder: LogDecoder,
                 head: bytes) -> Staging:
    """Where segment ``header.segment`` is staged, once its header is found to continue the
    resync staged here (or to begin one: index 0)."""
    assert header.segment is not None
    rid, k, _ = header.segment
    names = [d.name for d in header.disks]
    now = identities(copy)
    meta = _meta(vmdir)
    want = {"id": rid, "epoch": header.epoch, "seq": header.seq, "base_seq": header.base_seq, "peer": peer,
            "names": names}
    if k == 0 and (meta is None or {key: meta.get(key) for key in want} != want or _count(vmdir) > 1):
        discard(vmdir)  # a new resync: whatever an older one staged goes
        vmdir.create()
        folder(vmdir).mkdir(mode=0o700)
        write_atomic(folder(vmdir) / META, json.dumps({**want, "copy": now}).encode(), 0o600)
        meta = _meta(vmdir)
    if meta is None or {key: meta.get(key) for key in want} != want:
        raise WireError(f"segment {k} belongs to no resync staged here (id, point or files differ)")
    if meta.get("copy") != now:
        discard(vmdir)
        raise ResyncRequired("the replica copy was written since the resync's first segment: its staged segments "
                             "are dropped and the resync starts over")
    n = _count(vmdir)
    if k not in (n, n - 1):
        raise WireError(f"segment {k} is out of order: {n} are staged")
    staged = sum(_path(vmdir, i).stat().st_size for i in range(n))
    if staged > 4 * sum(d.size for d in header.disks) + SLACK:
        discard(vmdir)
        raise ResyncRequired(f"the resync's staged segments reached {staged} bytes, more than four copies' worth: "
                             "they are dropped and the resync starts over")
    final = _path(vmdir, k)
    return Staging.open_at(final.with_name(final.name + ".part"), final, decoder, head)


def merge(vmdir: VMDir, seq: int, count: int, copy: list[Path]) -> None:
    """Put segments 0..count-1 together, in order, into staged log ``seq`` (durable on
    return): the last one's header, each file resized first where its size changes, every
    record cut to the final sizes, the last one's fuzzy flag."""
    logs = [_path(vmdir, k) for k in range(count)]
    header = dataclasses.replace(read_header(logs[-1]), segment=None, mac=None, mac_nonce="")
    sizes = [d.size for d in header.disks]
    enc = LogEncoder(header, compress=False)
    part = vmdir.log_part(seq)
    fuzzy = False
    with open(part, "wb") as out:
        out.write(enc.start())
        for i, p in enumerate(copy):
            if not p.exists() or os.stat(p).st_size != sizes[i]:
                out.write(enc.resize(i, sizes[i]))
        for k, path in enumerate(logs):
            for item in read_log(path):
                if isinstance(item, Trailer):
                    fuzzy = item.fuzzy if k == count - 1 else fuzzy
                    continue
                if not isinstance(item, Record) or item.kind == RECORD_RESIZE or item.offset >= sizes[item.disk]:
                    continue
                n = min(item.length, sizes[item.disk] - item.offset)
                if item.kind == RECORD_DATA:
                    assert item.data is not None
                    out.write(enc.data(item.disk, item.offset, item.data[:n]))
                else:
                    out.write(enc.zero(item.disk, item.offset, n))
        out.write(enc.finish(fuzzy=fuzzy))
        out.flush()
        os.fsync(out.fileno())
    durable_rename(part, vmdir.log(seq))

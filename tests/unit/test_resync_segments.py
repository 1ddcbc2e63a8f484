"""A segmented resync's pieces below the daemons (issue 20 item 4): the segment header is
untrusted input; a segment scan reads only its range and keeps the view's digests outside
it; the replica stages segments only in order, for one resync of one peer, and puts them
together into one log whose apply gives the primary's bytes."""

import dataclasses
import os
import random

import pytest

from replicad.errors import ResyncRequired, WireError
from replicad.replica import segments
from replicad.replica.apply import apply_records
from replicad.replica.layout import VMDir
from replicad.tracking.digestmap import BLOCK, DigestMapReader
from replicad.tracking.scan import DataChange, DiskScan, ZeroChange, digest_disks
from replicad.wire import DiskInfo, Header, LogDecoder, LogEncoder

MiB = 1 << 20
HEADER = Header("0f0e0d0c-0000-4000-8000-000000000001", "vm", "e1", 3, 2, "resync", "t", "crash",
                (DiskInfo(0, "a.img", 16 * MiB),), segment=("00112233aabbccdd", 0, False))


@pytest.mark.parametrize("segment", [
    {"id": "../../etc/passwd", "index": 0, "last": False},
    {"id": "00112233AABBCCDD", "index": 0, "last": False},
    {"id": "00112233aabbccdd", "index": -1, "last": False},
    {"id": "00112233aabbccdd", "index": True, "last": False},
    {"id": "00112233aabbccdd", "index": 1 << 20, "last": False},
    {"id": "00112233aabbccdd", "index": 0, "last": 1},
    {"id": "00112233aabbccdd", "index": 0, "last": False, "more": 1},
    [0, 0, False],
])
def test_a_bad_segment_header_is_refused(segment):
    import json
    doc = json.loads(HEADER.to_json())
    doc["segment"] = segment
    with pytest.raises(WireError, match="bad segment"):
        Header.from_json(json.dumps(doc).encode())


def test_a_segment_belongs_to_a_resync_only():
    import json
    doc = json.loads(HEADER.to_json())
    assert Header.from_json(json.dumps(doc).encode()).segment == ("00112233aabbccdd", 0, False)
    doc["kind"] = "delta"
    with pytest.raises(WireError, match="bad segment"):
        Header.from_json(json.dumps(doc).encode())


def _write(path, size, seed):
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for _ in range(size // BLOCK // 4):
            f.seek(rnd.randrange(size // BLOCK) * BLOCK)
            f.write(rnd.randbytes(BLOCK))


def test_a_segment_scan_reads_its_range_and_keeps_the_view_outside_it(tmp_path):
    size = 16 * MiB
    disk, other = tmp_path / "d.img", tmp_path / "o.img"
    _write(disk, size, 1)
    _write(other, size, 2)
    ((view, _),) = digest_disks([other], tmp_path / "v")  # the replica's copy: other bytes
    start, stop = 4 * MiB, 8 * MiB
    reader = DigestMapReader(view)
    scan = DiskScan(disk, reader, tmp_path / "new.map", start=start, stop=stop, keep=True)
    changes = list(scan.changes())
    assert changes and all(start <= c.offset < stop for c in changes if isinstance(c, (DataChange, ZeroChange)))
    assert scan.read_bytes <= stop - start
    ((whole, _),) = digest_disks([disk], tmp_path / "w")
    new, old, now = DigestMapReader(tmp_path / "new.map"), DigestMapReader(view), DigestMapReader(whole)
    n = size // BLOCK
    assert new.slice(0, start // BLOCK) == old.slice(0, start // BLOCK)
    assert new.slice(start // BLOCK, (stop - start) // BLOCK) == now.slice(start // BLOCK, (stop - start) // BLOCK)
    assert new.slice(stop // BLOCK, n - stop // BLOCK) == old.slice(stop // BLOCK, n - stop // BLOCK)
    assert new.super_slice(0, 64) == old.super_slice(0, 64)
    assert new.super_slice(64, 64) == now.super_slice(64, 64)
    assert (new.identity.mtime_ns, new.identity.ino, new.identity.size) == (0, 0, size)  # never "unchanged"
    for r in (reader, new, old, now):
        r.close()


def _segment(tmp_path, index, last=False, rid="00112233aabbccdd", writes=(), size=16 * MiB, **kw):
    header = dataclasses.replace(HEADER, disks=(DiskInfo(0, "a.img", size),), segment=(rid, index, last), **kw)
    enc = LogEncoder(header, compress=False)
    blob = enc.start() + b"".join(enc.data(0, o, d) for o, d in writes) + enc.finish()
    dec = LogDecoder()
    head = blob[:len(enc.start())]
    dec.feed(head)
    return header, dec, head, blob[len(head):]


def _stage(vmdir, copy, header, dec, head, rest, peer="p1"):
    s = segments.open_staging(vmdir, header, peer, [copy], dec, head)
    s.write([rest])
    s.finish()


def test_the_replica_stages_segments_in_order_for_one_resync_and_puts_them_together(tmp_path):
    vmdir = VMDir(tmp_path / "vm")
    vmdir.create()
    copy = vmdir.disk("a.img")
    copy.write_bytes(b"o" * 16 * MiB)
    _stage(vmdir, copy, *_segment(tmp_path, 0, writes=[(0, b"a" * BLOCK), (8192, b"b" * BLOCK)]))
    assert segments.held(vmdir, "p1") == {"id": "00112233aabbccdd", "seq": 3, "base_seq": 2, "held": 1}
    assert segments.held(vmdir, "p2") is None  # only the peer that sent them is told
    for bad, why in [(_segment(tmp_path, 2), "out of order"),
                     (_segment(tmp_path, 1, rid="ffffffffffffffff"), "belongs to no resync"),
                     (_segment(tmp_path, 1, epoch="e2"), "belongs to no resync")]:
        with pytest.raises(WireError, match=why):
            segments.open_staging(vmdir, bad[0], "p1", [copy], bad[1], bad[2])
    with pytest.raises(WireError, match="belongs to no resync"):
        segments.open_staging(vmdir, *_segment(tmp_path, 1)[:1], "p2", [copy], *_segment(tmp_path, 1)[1:3])
    _stage(vmdir, copy, *_segment(tmp_path, 1, writes=[(0, b"c" * BLOCK)]))
    _stage(vmdir, copy, *_segment(tmp_path, 1, writes=[(0, b"C" * BLOCK)]))  # sent again: replaces it
    # the last one shrinks the disk: a record of an earlier segment past the end is cut away
    _stage(vmdir, copy, *_segment(tmp_path, 2, last=True, size=12 * MiB, writes=[(4096, b"d" * BLOCK)]))
    assert segments.held(vmdir, "p1")["held"] == 3
    segments.merge(vmdir, 3, 3, [copy])
    merged = vmdir.log(3)
    assert apply_records(merged, [copy]).segment is None
    got = copy.read_bytes()
    assert len(got) == 12 * MiB
    assert got[:3 * BLOCK] == b"C" * BLOCK + b"d" * BLOCK + b"b" * BLOCK
    assert got[3 * BLOCK:] == b"o" * (12 * MiB - 3 * BLOCK)
    assert segments.discard(vmdir, "p2") == 0 and segments.discard(vmdir, "p1") == 3
    assert not segments.folder(vmdir).exists()


def test_a_copy_written_since_the_first_segment_drops_them(tmp_path):
    vmdir = VMDir(tmp_path / "vm")
    vmdir.create()
    copy = vmdir.disk("a.img")
    copy.write_bytes(b"o" * 16 * MiB)
    _stage(vmdir, copy, *_segment(tmp_path, 0, writes=[(0, b"a" * BLOCK)]))
    with open(copy, "r+b") as f:
        f.write(b"x")
    st = os.stat(copy)
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(ResyncRequired, match="written since the resync's first segment"):
        _stage(vmdir, copy, *_segment(tmp_path, 1))
    assert not segments.folder(vmdir).exists()
    # a new resync (index 0, another id) replaces whatever an older one staged
    _stage(vmdir, copy, *_segment(tmp_path, 0, rid="aaaaaaaaaaaaaaaa"))
    assert segments.held(vmdir, "p1")["id"] == "aaaaaaaaaaaaaaaa"


def test_a_resync_continues_only_on_what_the_replica_holds(tmp_path):
    """primary/resync_progress.py: the same resync on the same point, holding what was sent
    (or one more, staged before its acknowledgement was lost: it is sent again)."""
    from replicad.primary.resync_progress import SegmentsSent, continuable

    sent = SegmentsSent("00112233aabbccdd", "e2", 7, 6, ["a.img"], ["disk0.map"], sent=3, of=8)

    def status(**kw):
        held = {"id": "00112233aabbccdd", "seq": 7, "base_seq": 6, "held": 3, **kw}
        return {"exists": True, "applied_seq": 6, "acked_seq": 6, "segments": held}
    assert continuable(sent, status())
    assert continuable(sent, status(held=4))  # the next one staged, its ack lost
    assert not continuable(sent, status(held=2))  # the replica lost one: start over
    assert not continuable(sent, status(held=5))
    assert not continuable(sent, status(id="ffffffffffffffff"))
    assert not continuable(sent, status(seq=8))
    assert not continuable(sent, {**status(), "applied_seq": 7, "acked_seq": 7})  # the copy moved on
    assert not continuable(sent, {"exists": True, "applied_seq": 6, "acked_seq": 6})  # nothing staged there
    assert not continuable(None, status())

"""The scan tracker's "unchanged file" shortcut (tracking/scan.py, digest map identity),
which a single-line mutation once weakened unnoticed (issue 16, item 8): a file whose
content changed and whose mtime was put back (``touch -d``, a restore tool, a VM manager
keeping timestamps) still has a new ctime, which no one can set, so it is read again."""

import os

from tests.integration.harness import wait_for

from replicad.tracking import scan as scan_mod
from replicad.tracking.digestmap import BLOCK, DigestMapReader, FileIdentity
from replicad.tracking.scan import DataChange, DiskScan


def scan(img, old_map, new_map):
    old = DigestMapReader.open(old_map) if old_map else None
    s = DiskScan(img, old, new_map)
    changes = [(c.offset, bytes(c.data)) for c in s.changes() if isinstance(c, DataChange)]
    if old is not None:
        old.close()
    return s, changes


def test_a_change_with_the_mtime_put_back_is_still_found(tmp_path, monkeypatch):
    monkeypatch.setattr(scan_mod, "RACY_NS", 0)  # as if the file were last written long ago
    img = tmp_path / "disk.img"
    img.write_bytes(os.urandom(64 * BLOCK))
    scan(img, None, tmp_path / "m0")
    recorded = DigestMapReader.open(tmp_path / "m0")
    before = recorded.identity
    recorded.close()
    assert before.ctime_ns != 0  # the map holds the real ctime (no racy guard here)

    new = os.urandom(BLOCK)
    with open(img, "r+b") as f:
        f.seek(5 * BLOCK)
        f.write(new)

    def mtime_put_back() -> bool:
        os.utime(img, ns=(before.mtime_ns, before.mtime_ns))  # moves ctime to now
        st = os.stat(img)
        return st.st_mtime_ns == before.mtime_ns and st.st_ctime_ns != before.ctime_ns
    wait_for(mtime_put_back, 5, "a ctime tick after the first scan")
    now = FileIdentity.of(os.stat(img))
    assert (now.size, now.mtime_ns, now.ino, now.dev) == (before.size, before.mtime_ns, before.ino, before.dev)

    s, changes = scan(img, tmp_path / "m0", tmp_path / "m1")
    assert not s.skipped, "a file whose ctime moved was taken as unchanged"
    assert changes == [(5 * BLOCK, new)]

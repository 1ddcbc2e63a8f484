"""The scan tracker: applying its changes to a copy of the old file yields the new file."""

import os
import random
import shutil

import pytest

from replicad.tracking.digestmap import BLOCK, DigestMapReader
from replicad.tracking import scan as scan_mod
from replicad.tracking.digestmap import FileIdentity
from replicad.tracking.scan import DataChange, DiskScan, Resize, ZeroChange, racy_guard


def scan(img, old_map, new_map):
    old = DigestMapReader.open(old_map) if old_map else None
    s = DiskScan(img, old, new_map)
    changes = [DataChange(c.offset, memoryview(bytes(c.data))) if isinstance(c, DataChange) else c
               for c in s.changes()]
    if old is not None:
        old.close()
    return s, changes


def apply(changes, target, size):
    with open(target, "r+b") as f:
        f.truncate(size)
        for c in changes:
            if isinstance(c, DataChange):
                f.seek(c.offset)
                f.write(c.data)
            elif isinstance(c, ZeroChange):
                f.seek(c.offset)
                f.write(bytes(c.length))
            elif isinstance(c, Resize):
                f.truncate(c.size)


@pytest.fixture
def image(tmp_path):
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(32 << 20)
        f.seek(1 << 20)
        f.write(os.urandom(2 << 20))
        f.seek(8 << 20)
        f.write(bytes(1 << 20))  # allocated zeros: not data
        f.write(b"tail" * 1000)
    return img


def test_initial_sends_only_data(image, tmp_path):
    s, changes = scan(image, None, tmp_path / "m1")
    assert s.changed_bytes == (2 << 20) + 4096  # 4000 bytes of tail in one block
    assert all(isinstance(c, DataChange) for c in changes)
    copy = tmp_path / "copy"
    copy.touch()
    apply(changes, copy, image.stat().st_size)
    assert copy.read_bytes() == image.read_bytes()


def test_delta_rounds(image, tmp_path):
    rnd = random.Random(7)
    copy = tmp_path / "copy"
    copy.touch()
    _, ch = scan(image, None, tmp_path / "m0")
    apply(ch, copy, image.stat().st_size)
    for r in range(1, 6):
        with open(image, "r+b") as f:
            for _ in range(40):
                f.seek(rnd.randrange(0, (32 << 20) // BLOCK) * BLOCK)
                f.write(os.urandom(BLOCK))
            f.seek(1 << 20)
            f.write(bytes(3 * BLOCK))  # data becomes zeros
            if r == 3:
                f.truncate(40 << 20 | 123)  # growth to an odd size
            if r == 4:
                f.truncate(20 << 20)  # shrink
        s, ch = scan(image, tmp_path / f"m{r - 1}", tmp_path / f"m{r}")
        assert s.changed_bytes <= 48 * BLOCK or r == 3
        apply(ch, copy, image.stat().st_size)
        assert copy.read_bytes() == image.read_bytes(), f"round {r}"


def test_scattered_4k_writes_stay_small(image, tmp_path):
    scan(image, None, tmp_path / "m0")
    with open(image, "r+b") as f:
        for i in range(80):  # 80 writes spread over the whole image
            f.seek(i * (400 << 10))
            f.write(os.urandom(BLOCK))
    s, _ = scan(image, tmp_path / "m0", tmp_path / "m1")
    assert s.changed_bytes == 80 * BLOCK


def test_unchanged_file_is_not_read(image, tmp_path, monkeypatch):
    monkeypatch.setattr(scan_mod, "RACY_NS", 0)  # as if the file were last written long ago
    scan(image, None, tmp_path / "m0")
    s, ch = scan(image, tmp_path / "m0", tmp_path / "m1")
    assert (s.skipped, s.read_bytes, ch) == (True, 0, [])
    os.utime(image)  # touched but same content: read, nothing sent
    s, ch = scan(image, tmp_path / "m1", tmp_path / "m2")
    assert (s.skipped, ch) == (False, []) and s.read_bytes > 0


def test_recently_written_file_is_read_again(image, tmp_path):
    """A file written within a timestamp tick of its scan could change again without its
    mtime moving: its identity is recorded so that the next scan cannot skip it."""
    scan(image, None, tmp_path / "m0")
    s, ch = scan(image, tmp_path / "m0", tmp_path / "m1")
    assert (s.skipped, ch) == (False, []) and s.read_bytes > 0
    m = DigestMapReader.open(tmp_path / "m1")
    assert m.identity.ctime_ns == 0
    m.close()


def test_racy_guard_only_touches_recent_identities():
    now = 10**19
    old = FileIdentity(1, now - 3 * 10**9, now - 3 * 10**9, 7, 8)
    assert racy_guard(old, now) == old
    fresh = FileIdentity(1, now - 10**9, now - 3 * 10**9, 7, 8)
    assert racy_guard(fresh, now).ctime_ns == 0 and racy_guard(fresh, now).mtime_ns == fresh.mtime_ns


def test_damaged_map_reads_as_missing(image, tmp_path):
    scan(image, None, tmp_path / "m0")
    shutil.copy(tmp_path / "m0", tmp_path / "bad")
    with open(tmp_path / "bad", "r+b") as f:
        f.truncate(100)
    assert DigestMapReader.open(tmp_path / "bad") is None
    assert DigestMapReader.open(tmp_path / "absent") is None


def test_holes_are_not_read(tmp_path):
    img = tmp_path / "sparse.img"
    with open(img, "wb") as f:
        f.truncate(1 << 30)
        f.seek(512 << 20)
        f.write(b"x" * BLOCK)
    s, ch = scan(img, None, tmp_path / "m")
    assert s.read_bytes < 8 << 20  # one data region, not the whole GiB
    assert [(c.offset, len(c.data)) for c in ch] == [(512 << 20, BLOCK)]


@pytest.mark.parametrize("seed", range(20))
def test_differing_finds_exactly_the_changed_digests(seed):
    from array import array

    from replicad.tracking.scan import differing
    rnd = random.Random(seed)
    n = rnd.choice([1, 7, 8, 9, 1024, 1000])
    old = array("Q", (rnd.getrandbits(64) for _ in range(n)))
    new = array("Q", old)
    changed = sorted(rnd.sample(range(n), rnd.randrange(0, n + 1) if n < 20 else rnd.randrange(0, 40)))
    for i in changed:
        new[i] ^= 1 << rnd.randrange(64)
    assert list(differing(new, old)) == changed

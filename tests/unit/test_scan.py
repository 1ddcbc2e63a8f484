"""The scan tracker: applying its changes to a copy of the old file yields the new file."""

import itertools
import os
import random
import shutil

import pytest

from replicad.tracking import scan as scan_mod
from replicad.tracking.digestmap import BLOCK, DigestMapReader, FileIdentity
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


@pytest.mark.parametrize("seed", range(12))
def test_changed_blocks_come_out_as_exact_runs(tmp_path, seed):
    """Random rewrites, zeroed runs and single zero blocks, next to each other and across
    chunk edges: the delta rebuilds the file, carries exactly the changed blocks, and
    merges neighbours into runs (data extents at most MAX_EXTENT)."""
    rnd = random.Random(seed)
    size = 3 * scan_mod.CHUNK + rnd.choice([0, 1000, BLOCK])  # a short last block, sometimes
    img, base = tmp_path / "disk.img", tmp_path / "base.img"
    img.write_bytes(rnd.randbytes(size))
    shutil.copy(img, base)
    scan(img, None, tmp_path / "m1")
    changed = set()
    with open(img, "r+b") as f:
        for _ in range(rnd.randrange(1, 30)):
            first = rnd.randrange(0, size // BLOCK)
            count = rnd.choice([1, 1, 2, 17, 300, 1100])
            blocks = range(first, min(first + count, size // BLOCK))
            f.seek(first * BLOCK)
            f.write(bytes(len(blocks) * BLOCK) if rnd.random() < 0.5 else rnd.randbytes(len(blocks) * BLOCK))
            changed.update(blocks)
    s, changes = scan(img, tmp_path / "m1", tmp_path / "m2")
    apply(changes, base, size)
    assert base.read_bytes() == img.read_bytes()
    covered = set()
    for c in changes:
        length = len(c.data) if isinstance(c, DataChange) else c.length
        assert c.offset % BLOCK == 0 and length <= (scan_mod.MAX_EXTENT if isinstance(c, DataChange) else 1 << 40)
        covered.update(range(c.offset // BLOCK, -(-(c.offset + length) // BLOCK)))
    # only blocks that were written, and of those only the ones whose content changed (a block
    # that was zero and was zeroed again is not sent)
    assert covered <= changed
    assert s.changed_bytes <= len(changed) * BLOCK
    # neighbours of the same kind are one change, up to the extent limit
    for x, y in itertools.pairwise(changes):
        if isinstance(x, ZeroChange) and isinstance(y, ZeroChange):
            assert x.offset + x.length < y.offset or x.offset // scan_mod.CHUNK != y.offset // scan_mod.CHUNK


def test_a_data_block_with_the_zero_blocks_digest_is_sent_as_data(tmp_path, monkeypatch):
    """Digests are not identities: a changed block whose digest matches the zero block's is
    compared with zeros before it is sent as a zero record."""
    import xxhash
    img, base = tmp_path / "disk.img", tmp_path / "base.img"
    img.write_bytes(os.urandom(4 << 20))
    shutil.copy(img, base)
    scan(img, None, tmp_path / "m1")
    pattern = b"\x5a" * BLOCK
    with open(img, "r+b") as f:
        for b in (3, 4, 9):
            f.seek(b * BLOCK)
            f.write(pattern)
        f.seek(20 * BLOCK)
        f.write(bytes(2 * BLOCK))
    real = scan_mod.zero_digest
    monkeypatch.setattr(scan_mod, "zero_digest",
                        lambda n: xxhash.xxh3_64_intdigest(pattern) if n == BLOCK else real(n))
    s, changes = scan(img, tmp_path / "m1", tmp_path / "m2")
    apply(changes, base, 4 << 20)
    assert base.read_bytes() == img.read_bytes()
    assert {(c.offset // BLOCK, type(c).__name__) for c in changes} >= {(3, "DataChange"), (9, "DataChange")}

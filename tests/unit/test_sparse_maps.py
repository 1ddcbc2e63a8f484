"""Digest maps of thin disks (issue 18, scale): a map costs what the disk's data needs, not
its declared size, and a scan over one finds exactly what changed — data written into a
hole, data punched back into a hole, a short last block — from a sparse map or from an
older dense one."""

import os
import random
from array import array

import xxhash
from tests.integration.images import same_sparse
from tests.unit.test_scan import apply, scan

from replicad.fsutil import punch_hole
from replicad.tracking import scan as scan_mod
from replicad.tracking.digestmap import BLOCK, VERSION, DigestMapReader, DigestMapWriter, map_length

GiB, MiB = 1 << 30, 1 << 20


def thin(path, size, pieces, seed=1):
    """A sparse file of ``size`` with 1 MiB of random data at each of ``pieces`` offsets."""
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for at in pieces:
            f.seek(at)
            f.write(rnd.randbytes(MiB))


def allocated(path) -> int:
    return os.stat(path).st_blocks * 512


def test_a_thin_disk_s_map_costs_what_its_data_needs(tmp_path):
    img = tmp_path / "thin.img"
    thin(img, 64 * GiB, [g * GiB for g in range(0, 64, 16)])  # 4 MiB of data in 64 GiB
    s, _ = scan(img, None, tmp_path / "m1")
    m = tmp_path / "m1"
    assert os.path.getsize(m) == map_length(64 * GiB)  # 128 MiB if it were dense
    # 1,024 data blocks: 8 KiB of digests (a page or two per data region), and the super-blocks
    assert allocated(m) <= 4 * 4 * 4096 + 4096
    r = DigestMapReader.open(m)
    runs = list(r.data_runs(0, r.blocks))
    assert r.sparse and sum(b - a for a, b in runs) <= 8 * 1024  # a page or two around each region
    data = [g * GiB // BLOCK + i for g in range(0, 64, 16) for i in range(256)]
    assert all(any(a <= blk < b for a, b in runs) for blk in data)  # every data block's digest is in a run
    r.close()
    with open(img, "r+b") as f:  # one block written in a hole: the next map grows by a page
        f.seek(40 * GiB)
        f.write(os.urandom(BLOCK))
    s, ch = scan(img, m, tmp_path / "m2")
    assert [(c.offset, len(c.data)) for c in ch] == [(40 * GiB, BLOCK)]
    assert allocated(tmp_path / "m2") <= allocated(m) + 2 * 4096


def test_deltas_over_sparse_maps_rebuild_the_disk(tmp_path):
    size = GiB + 1000  # a short last block and super-block, in a hole
    img, copy = tmp_path / "disk.img", tmp_path / "copy.img"
    thin(img, size, [0, 100 * MiB, 300 * MiB, 700 * MiB])
    copy.touch()
    _, ch = scan(img, None, tmp_path / "m0")
    apply(ch, copy, size)
    rnd = random.Random(3)
    for r in range(1, 5):
        with open(img, "r+b") as f:
            for _ in range(20):  # scattered writes, in data and in holes
                f.seek(rnd.randrange(size // BLOCK) * BLOCK)
                f.write(os.urandom(BLOCK))
            if r == 2:  # a data region punched back into a hole (a guest's TRIM): zeros to send
                punch_hole(f.fileno(), 100 * MiB, MiB)
            if r == 3:
                f.truncate(size + 5 * MiB)  # growth, the new tail a hole
        s, ch = scan(img, tmp_path / f"m{r - 1}", tmp_path / f"m{r}")
        if r == 2:
            assert any(c.offset == 100 * MiB and c.length >= MiB - 20 * BLOCK for c in ch
                       if isinstance(c, scan_mod.ZeroChange))
        apply(ch, copy, os.path.getsize(img))
        assert same_sparse(copy, img), f"round {r}"
    os.utime(img)  # the same bytes: a scan reads them and finds nothing, short last block too
    s, ch = scan(img, tmp_path / "m4", tmp_path / "m5")
    assert not s.skipped and ch == []


def test_a_dense_map_from_an_older_version_still_leads_the_next_scan(tmp_path, monkeypatch):
    img, copy = tmp_path / "disk.img", tmp_path / "copy.img"
    thin(img, 256 * MiB, [0, 64 * MiB])
    copy.touch()
    with monkeypatch.context() as m:  # written as before: version 2, every digest in place
        m.setattr(scan_mod, "new_map_writer", lambda path, ident, compress=False: DigestMapWriter(path, ident))
        _, ch = scan(img, None, tmp_path / "v2")
    apply(ch, copy, 256 * MiB)
    r = DigestMapReader.open(tmp_path / "v2")
    assert not r.sparse
    r.close()
    with open(img, "r+b") as f:
        f.seek(200 * MiB)
        f.write(os.urandom(BLOCK))
        punch_hole(f.fileno(), 64 * MiB, 4 * BLOCK)
    _, ch = scan(img, tmp_path / "v2", tmp_path / "v3")
    apply(ch, copy, 256 * MiB)
    assert copy.read_bytes() == img.read_bytes()
    r = DigestMapReader.open(tmp_path / "v3")
    assert r.sparse and VERSION == 3
    r.close()


def test_scattered_writes_across_map_windows_keep_every_digest_exact(tmp_path, monkeypatch):
    """A delta scan reads the old map in windows and gathers the new map's digests into few
    writes: scattered writes, into data and into holes, on both sides of window boundaries
    (windows shrunk to 64 digests here), a hole punched: the changes rebuild the disk, and the
    new map holds every block's and super-block's digest, read in a window or across two."""
    from replicad.tracking import digestmap
    monkeypatch.setattr(digestmap, "WINDOW", 64)
    monkeypatch.setattr(scan_mod, "WINDOW", 64)
    size = 48 * MiB + 3 * BLOCK + 100  # a short last block
    img, copy = tmp_path / "disk.img", tmp_path / "copy.img"
    thin(img, size, [0, 5 * MiB, 20 * MiB, 47 * MiB])
    copy.touch()
    _, ch = scan(img, None, tmp_path / "m0")
    apply(ch, copy, size)
    rnd = random.Random(5)
    with open(img, "r+b") as f:
        for blk in [63, 64, 65, 1023, 1024, 4095, 4096] + rnd.sample(range(size // BLOCK), 300):
            f.seek(blk * BLOCK)
            f.write(rnd.randbytes(BLOCK))
        punch_hole(f.fileno(), 20 * MiB, 16 * BLOCK)
    _, ch = scan(img, tmp_path / "m0", tmp_path / "m1")
    apply(ch, copy, size)
    assert copy.read_bytes() == img.read_bytes()
    data = img.read_bytes()  # the oracle: every block's and super-block's xxh3, hashed here
    blocks = array("Q", (xxhash.xxh3_64_intdigest(data[i:i + BLOCK]) for i in range(0, size, BLOCK)))
    supers = array("Q", (xxhash.xxh3_64_intdigest(data[i:i + 16 * BLOCK]) for i in range(0, size, 16 * BLOCK)))
    r = DigestMapReader.open(tmp_path / "m1")
    assert r.slice(0, r.blocks) == blocks and r.super_slice(0, r.supers) == supers  # longer than a window
    for first, count in [(0, 10), (60, 10), (63, 2), (127, 64), (1000, 64), (r.blocks - 3, 10)]:
        assert r.slice(first, count) == blocks[first:first + count]  # in a window, across two, at the end
        assert r.super_slice(first // 16, count) == supers[first // 16:first // 16 + count]
    r.close()


def test_a_delta_scan_of_a_thin_disk_reads_little_of_its_old_map(tmp_path, monkeypatch):
    """The old map is read in windows around the disk's data, not in windows so wide that a
    thin disk's scan reads much of a map it holds no data in (64 GiB: a 128 MiB map)."""
    from replicad.tracking import digestmap
    img = tmp_path / "thin.img"
    thin(img, 64 * GiB, [g * GiB for g in range(0, 64, 4)])  # 16 MiB of data in 64 GiB
    scan(img, None, tmp_path / "m1")
    with open(img, "r+b") as f:
        f.seek(8 * GiB + 5 * BLOCK)
        f.write(os.urandom(BLOCK))
    read = []
    real = os.pread
    monkeypatch.setattr(digestmap.os, "pread", lambda fd, n, at: read.append(n) or real(fd, n, at))
    _, ch = scan(img, tmp_path / "m1", tmp_path / "m2")
    assert [(c.offset, len(c.data)) for c in ch] == [(8 * GiB + 5 * BLOCK, BLOCK)]
    # the map holds 32 KiB of digests for the 16 MiB of data: reads stay within 16 times that
    # (a window of each part around each region, and the rest of the region's last map page)
    assert sum(read) <= 16 * 32 * 1024


def test_the_holes_around_a_write_in_a_hole_are_not_read(tmp_path, monkeypatch):
    """A guest's 4 KiB write into a hole makes a 64 KiB super-block to hash: its 60 KiB of
    hole are zeros put in the buffer, never read; the digests and the changes are those of
    the disk as it is (two writes in one super-block, one at the edge of a data piece)."""
    size = 64 * MiB
    img, copy = tmp_path / "disk.img", tmp_path / "copy.img"
    thin(img, size, [0, 20 * MiB])
    copy.touch()
    _, ch = scan(img, None, tmp_path / "m0")
    apply(ch, copy, size)
    writes = [40 * MiB + 3 * BLOCK, 40 * MiB + 9 * BLOCK, 21 * MiB, 63 * MiB + 15 * BLOCK]
    with open(img, "r+b") as f:
        for at in writes:
            f.seek(at)
            f.write(os.urandom(BLOCK))
    read = []
    real = os.preadv
    monkeypatch.setattr(scan_mod.os, "preadv", lambda fd, bufs, at: read.append(len(bufs[0])) or real(fd, bufs, at))
    _, ch = scan(img, tmp_path / "m0", tmp_path / "m1")
    assert sum(read) == 2 * MiB + len(writes) * BLOCK  # the data, not the super-blocks around it
    assert sorted(c.offset for c in ch) == sorted(writes)
    apply(ch, copy, size)
    assert copy.read_bytes() == img.read_bytes()
    data = img.read_bytes()
    r = DigestMapReader.open(tmp_path / "m1")
    assert r.super_slice(0, r.supers) == array(
        "Q", (xxhash.xxh3_64_intdigest(data[i:i + 16 * BLOCK]) for i in range(0, size, 16 * BLOCK)))
    r.close()

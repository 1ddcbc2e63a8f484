"""Disk images for tests: sparse, with data, allocated zeros and holes."""

import os
import random
from pathlib import Path

BLOCK = 4096


def make_sparse_image(path: Path, size: int, *, data_pieces: int = 64, piece: int = 256 << 10, seed: int = 1) -> int:
    """A sparse image with scattered random data and allocated zero runs; returns data bytes."""
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        step = size // data_pieces
        for i in range(data_pieces):
            f.seek(i * step)
            f.write(rnd.randbytes(piece))
            f.write(bytes(piece))  # allocated zeros: never data on the wire
    return data_pieces * piece


def scribble(path: Path, writes: int, *, seed: int) -> None:
    """Random 4 KiB writes across the whole image, as a running guest would do."""
    rnd = random.Random(seed)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        for _ in range(writes):
            f.seek(rnd.randrange(size // BLOCK) * BLOCK)
            f.write(rnd.randbytes(BLOCK))
        f.flush()
        os.fsync(f.fileno())


def _regions(fd: int, size: int) -> list[tuple[int, int]]:
    """The file's data regions (SEEK_DATA/SEEK_HOLE): everything else reads as zeros."""
    out, pos = [], 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: no data past pos
            break
        end = os.lseek(fd, start, os.SEEK_HOLE)
        out.append((start, end))
        pos = end
    return out


def same_sparse(a: Path, b: Path) -> bool:
    """Byte-identical, reading only where either file holds data (a 1 TiB image read whole
    would take minutes of zeros)."""
    if a.stat().st_size != b.stat().st_size:
        return False
    size = a.stat().st_size
    with open(a, "rb") as fa, open(b, "rb") as fb:
        spans = sorted(_regions(fa.fileno(), size) + _regions(fb.fileno(), size))
        pos = 0
        for start, end in spans:
            start = max(start, pos)
            while start < end:
                n = min(end - start, 8 << 20)
                if os.pread(fa.fileno(), n, start) != os.pread(fb.fileno(), n, start):
                    return False
                start += n
            pos = max(pos, end)
    return True

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

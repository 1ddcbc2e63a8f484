"""What an apply wrote into a replica copy, as the block digests that `verify --at-rest`
records at commit (replica/at_rest.py), taken from the log's own data as it is written: the
log was verified at receipt (checksums, MACs), so its bytes are what the copy must hold,
and nothing is read back or decoded a second time.

A block that a record covers only in part (a write shorter than a block, not at the end of
the file) is named for reading back after the apply, when the copy holds its final bytes.
A resize, or more blocks than ``LIMIT``, gives up (``complete`` False): the caller then
digests what the log wrote by reading it back, as before."""

from __future__ import annotations

from array import array
from collections.abc import Iterator

import xxhash

from ..tracking.digestmap import BLOCK, zero_digest

LIMIT = 1 << 20  # blocks remembered (16 bytes each: at most 16 MiB, 4 GiB of data written)


class Written:
    """Per file of the copy: the digests of the blocks written, in the order written (a later
    write of a block wins), and the blocks to read back."""

    def __init__(self, sizes: list[int]):
        self.sizes = list(sizes)
        self.blocks = [array("Q") for _ in sizes]
        self.digests = [array("Q") for _ in sizes]
        self.partial: list[set[int]] = [set() for _ in sizes]
        self.complete = True
        self._count = 0

    def _span(self, disk: int, offset: int, length: int) -> tuple[int, int] | None:
        """The whole blocks [first, end) of ``offset``, ``length`` (the file's short last block
        counts as whole when the write reaches the end of the file); the partly covered
        blocks are noted for reading back. None when there is no such file or it is over."""
        if not self.complete or disk >= len(self.sizes) or length <= 0:
            return None
        size = self.sizes[disk]
        stop = min(offset + length, size)
        if stop <= offset:
            return None
        first = -(-offset // BLOCK)
        end = stop // BLOCK if stop < size else -(-size // BLOCK)
        if offset % BLOCK:
            self.partial[disk].add(offset // BLOCK)
        if stop < size and stop % BLOCK and stop // BLOCK >= first:
            self.partial[disk].add(stop // BLOCK)
        if end <= first:
            return None
        self._count += end - first
        if self._count > LIMIT:
            self.give_up()
            return None
        return first, end

    def data(self, disk: int, offset: int, data: bytes | memoryview) -> None:
        span = self._span(disk, offset, len(data))
        if span is None:
            return
        first, end = span
        mv = memoryview(data)
        skip = first * BLOCK - offset
        h = xxhash.xxh3_64_intdigest
        self.blocks[disk].extend(range(first, end))
        self.digests[disk].extend(map(h, (mv[a:a + BLOCK] for a in range(skip, skip + (end - first) * BLOCK, BLOCK))))

    def zero(self, disk: int, offset: int, length: int) -> None:
        span = self._span(disk, offset, length)
        if span is None:
            return
        first, end = span
        size = self.sizes[disk]
        self.blocks[disk].extend(range(first, end))
        self.digests[disk].extend(array("Q", [zero_digest(BLOCK)]) * (end - first))
        if end * BLOCK > size:  # the file's short last block
            self.digests[disk][-1] = zero_digest(size - (end - 1) * BLOCK)

    def give_up(self) -> None:
        self.complete = False
        self.blocks = [array("Q") for _ in self.sizes]
        self.digests = [array("Q") for _ in self.sizes]
        self.partial = [set() for _ in self.sizes]

    def runs(self, disk: int) -> Iterator[tuple[int, array[int]]]:
        """(first block, digests) of consecutive blocks, in the order they were written."""
        blocks, digests = self.blocks[disk], self.digests[disk]
        i = 0
        while i < len(blocks):
            j = i + 1
            while j < len(blocks) and blocks[j] == blocks[j - 1] + 1:
                j += 1
            yield blocks[i], digests[i:j]
            i = j

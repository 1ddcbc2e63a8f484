"""Writing a new replica copy fast: adjacent records combined into 4 MiB writes with O_DIRECT.

An initial copy is the largest write a replica server makes. Through the page cache every
byte is copied by the kernel into freshly allocated pages and flushed again by fsync; on
the virtual machines replicad often runs on, that copy (first-touch of guest memory) cost
more than half of the replica's CPU (perf: copy_folio_from_iter_atomic, 54%). With
O_DIRECT the device reads our buffer itself; writes of 4 MiB keep it streaming (1 MiB
direct writes were five times slower here, being latency-bound). Records arrive in order
and mostly back to back, so they are combined in one page-aligned buffer and written when
the buffer is full or the next record is not adjacent. What O_DIRECT cannot take (a tail
shorter than a block, a filesystem without O_DIRECT such as older tmpfs) goes through the
ordinary descriptor. The caller fsyncs at the end, as for any write.

Buffers take turns (BUFFERS of them): while the device reads one (``pwrite`` in this
writer's own thread, the GIL released), the next records are received into the others, so
receiving waits for the disk only when the disk is the slower of the two. A checkpoint
(fsync, then a note that the data is durable) runs in the same thread, in order, after the
writes before it; if any write failed, nothing queued after it runs and the caller gets
the error at its next call. ``slot()``/``filled()`` let a
receiver read a record from the socket straight into the buffer (wire/codec.py ``pull``)."""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from ..wire import RECORD_DATA, Record
from .apply import apply_record

COMBINE = 4 << 20
BUFFERS = 4
ALIGN = 4096


class CopyWriter:
    def __init__(self, path: os.PathLike, size: int, *, truncate: bool = True):
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | (os.O_TRUNC if truncate else 0), 0o600)
        try:
            os.ftruncate(self.fd, size)  # sparse: holes and zero blocks are never written
            try:
                self._dfd = os.open(path, os.O_WRONLY | os.O_DIRECT)
            except OSError:
                self._dfd = -1
        except BaseException:
            os.close(self.fd)
            raise
        self.direct = self._dfd >= 0
        self._bufs: list[mmap.mmap] = []          # allocated as they are first needed
        self._busy: list[Future | None] = []      # each buffer's write in flight
        self._cur = 0
        self._start = 0
        self._len = 0
        self._last: Future | None = None          # the last task queued
        self._failed: BaseException | None = None
        self._thread: ThreadPoolExecutor | None = None
        self._scratch: tuple[int, memoryview] = (0, memoryview(b""))  # slot() without O_DIRECT

    def record(self, item: Record) -> None:
        if item.kind != RECORD_DATA or not self.direct:
            self.flush()
            self._drain()  # a zero or resize record lands after every earlier write
            apply_record(self.fd, item)
            return
        assert item.data is not None  # decoded with its payload
        offset, data = item.offset, memoryview(item.data)
        while data:
            n = min(len(data), COMBINE)
            self.slot(offset, n)[:] = data[:n]
            self.filled(n)
            offset += n
            data = data[n:]

    def slot(self, offset: int, n: int) -> memoryview:
        """The buffer space where the ``n`` bytes at ``offset`` go (``n`` <= COMBINE); call
        ``filled(n)`` once they are there and verified. Without O_DIRECT, a scratch buffer
        that ``filled`` writes through the ordinary descriptor."""
        if not self.direct:
            self._scratch = (offset, memoryview(bytearray(n)))
            return self._scratch[1]
        if self._len and (offset != self._start + self._len or self._len + n > COMBINE):
            self.flush()
        if not self._len:
            self._start = offset
            self._claim()
        return memoryview(self._bufs[self._cur])[self._len:self._len + n]

    def filled(self, n: int) -> None:
        if not self.direct:
            offset, view = self._scratch
            done = 0
            while done < n:
                done += os.pwrite(self.fd, view[done:n], offset + done)
            return
        self._len += n
        if self._len == COMBINE:
            self.flush()

    def _claim(self) -> None:
        """Make the current buffer free to fill: allocated, and its last write done."""
        if self._cur == len(self._bufs):
            self._bufs.append(mmap.mmap(-1, COMBINE))
            self._busy.append(None)
        busy, self._busy[self._cur] = self._busy[self._cur], None
        if busy is not None:
            busy.result()
        self._raise_failed()

    def flush(self) -> None:
        """Queue the current buffer's write; the next records go to the next buffer."""
        if not self._len:
            return
        self._busy[self._cur] = self._queue(self._write, self._bufs[self._cur], self._start, self._len)
        self._cur = (self._cur + 1) % BUFFERS
        self._len = 0

    def checkpoint(self, durable: Callable[[], None]) -> None:
        """Once every write so far is on the disk and fsynced, call ``durable`` (in the
        writer's thread: receiving goes on meanwhile)."""
        self.flush()
        if self._thread is None and not self._bufs:  # nothing was ever queued: inline
            os.fsync(self.fd)
            durable()
            return

        def run() -> None:
            os.fsync(self.fd)
            durable()
        self._queue(run)

    def _queue(self, fn: Callable, *args) -> Future:
        if self._thread is None:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="copywriter")
        self._last = self._thread.submit(self._guarded, fn, *args)
        return self._last

    def _guarded(self, fn: Callable, *args) -> None:
        if self._failed is not None:  # an earlier write failed: nothing after it may run
            return
        try:
            fn(*args)
        except BaseException as e:  # noqa: BLE001 — handed to the caller by _raise_failed
            self._failed = e

    def _raise_failed(self) -> None:
        if self._failed is not None:
            raise self._failed

    def _write(self, buf: mmap.mmap, start: int, length: int) -> None:
        view = memoryview(buf)
        try:
            aligned = length // ALIGN * ALIGN if start % ALIGN == 0 else 0
            done = 0
            while done < aligned:
                done += os.pwrite(self._dfd, view[done:aligned], start + done)
            while done < length:
                done += os.pwrite(self.fd, view[done:length], start + done)
        finally:
            view.release()

    def _drain(self) -> None:
        """Wait for everything queued (the executor runs tasks in order)."""
        last, self._last = self._last, None
        if last is not None:
            last.result()
        self._busy = [None] * len(self._busy)
        self._raise_failed()

    def sync(self) -> None:
        self.flush()
        self._drain()
        os.fsync(self.fd)

    def close(self) -> None:
        """Release everything; what was never flushed is dropped (it was not verified, or
        the copy is being abandoned); queued work is waited for first."""
        if self._thread is not None:
            self._thread.shutdown(wait=True)
            self._thread = None
        for fd in (self._dfd, self.fd):
            if fd >= 0:
                os.close(fd)
        self._dfd = self.fd = -1
        for b in self._bufs:
            try:
                b.close()
            except BufferError:  # a record still holds a view of it: freed with that view
                pass
        self._bufs, self._busy = [], []

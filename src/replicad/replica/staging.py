"""Where a received log's bytes go (transport/endpoints.py ``LogWriter``), in worker threads:

- ``Staging``: to ``logs/<seq>.log.part`` through the decoder; ``finish`` makes it the
  durable ``<seq>.log`` that the applier applies (replica/applier.py);
- ``DirectInitial``: an initial copy into a copy with no committed point yet, straight into
  the disks as the records are verified, with durable progress for a resume.

Both are opened with what the header read already verified, take the rest by ``write``
(an HTTP body's chunks) or ``pull`` (the upgraded connection), and end with ``finish``
(the trailer verified, everything durable) or ``abort``."""

from __future__ import annotations

import json
import os
from array import array
from dataclasses import dataclass, field
from pathlib import Path

from ..fsutil import durable_rename, fsync_dir, write_atomic
from ..transport.raw import RawLog
from ..wire import RECORD_DATA, Header, LogDecoder, Record
from .copywriter import CopyWriter
from .layout import PROGRESS_FILE, VMDir

STAGE_BATCH = 4 << 20               # bytes read from a raw connection at once into a staged log
RUNS_MAX = 1 << 16                  # runs of data records remembered for the apply's reservation
PROGRESS_EVERY = 32 << 20           # bytes between progress points: at most this much is resent


@dataclass
class Staging:
    """A log being received: bytes go to ``<seq>.log.part`` and through the decoder."""

    part: Path
    final: Path
    decoder: LogDecoder
    fd: int
    # (disk, start, end) of each run of contiguous data records, as verified: what the apply
    # reserves before its first write (replica/apply.py ``reserve_data``) without decoding
    # the log once more; None past RUNS_MAX runs (the apply then reads them from the log)
    runs: array[int] | None = field(default_factory=lambda: array("Q"))

    @classmethod
    def open(cls, vmdir: VMDir, seq: int, decoder: LogDecoder, verified: bytes = b"") -> Staging:
        """``verified``: the log's first bytes, which ``decoder`` already took (the header)."""
        vmdir.create()
        return cls.open_at(vmdir.log_part(seq), vmdir.log(seq), decoder, verified)

    @classmethod
    def open_at(cls, part: Path, final: Path, decoder: LogDecoder, verified: bytes = b"") -> Staging:
        """Staged at ``part``, made ``final`` by ``finish`` (a resync's segment: replica/segments.py)."""
        staging = cls(part, final, decoder, os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
        try:
            staging._append(verified)
        except BaseException:
            staging.abort()
            raise
        return staging

    def write(self, pieces: list[bytes]) -> None:
        """Verify and append to the staged file."""
        for piece in pieces:
            items = self.decoder.feed(piece)  # raises WireError on the first bad byte
            if self.runs is not None:
                self._note(items)
            self._append(piece)

    def _note(self, items: list) -> None:
        runs = self.runs
        assert runs is not None
        for it in items:
            if isinstance(it, Record) and it.kind == RECORD_DATA:
                if runs and runs[-3] == it.disk and runs[-1] == it.offset:
                    runs[-1] = it.offset + it.length
                elif len(runs) < 3 * RUNS_MAX:
                    runs.extend((it.disk, it.offset, it.offset + it.length))
                else:
                    self.runs = None
                    return

    def _append(self, piece: bytes) -> None:
        view = memoryview(piece)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]

    def pull(self, source: RawLog) -> None:
        """Receive the rest of the log from a raw connection, up to its trailer."""
        while self.decoder.trailer is None:
            piece = source.recv(STAGE_BATCH)
            if not piece:
                raise ConnectionResetError("the primary closed the connection in the middle of the log")
            self.write([piece])

    def finish(self) -> None:
        self.decoder.close()
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        durable_rename(self.part, self.final)

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.part.unlink(missing_ok=True)


@dataclass
class DirectInitial:
    """An initial log written straight into a copy that has no committed point yet.

    Staging it first would write every byte twice (log, then copy) and read it back once;
    with no earlier point to protect, the records go to the disks as they are verified and
    the copy is committed when the trailer verifies and the disks are fsynced. A crash or a
    refused log leaves a copy that was never committed: the primary starts over."""

    decoder: LogDecoder
    writers: list[CopyWriter]
    folder: Path
    progress_path: Path | None = None  # where durable progress is recorded, for a resume
    progress_meta: dict | None = None  # what binds it: epoch, seq, the peer
    _at: tuple[int, int] = (0, 0)      # end of the last record applied: (disk, offset)
    _unsynced: int = 0

    @classmethod
    def open(cls, vmdir: VMDir, header: Header, decoder: LogDecoder, meta: dict,
             decoded: list | None = None) -> DirectInitial:
        """``decoded``: the items ``decoder`` already gave after the header."""
        vmdir.create()
        if header.resume is None:  # a new attempt: an older attempt's progress means nothing now
            (vmdir.root / PROGRESS_FILE).unlink(missing_ok=True)
        writers: list[CopyWriter] = []
        try:
            for d in header.disks:
                # a resume keeps what the interrupted attempt made durable
                writers.append(CopyWriter(vmdir.disk(d.name), d.size, truncate=header.resume is None))
        except BaseException:
            for w in writers:
                w.close()
            raise
        direct = cls(decoder, writers, vmdir.disks, vmdir.root / PROGRESS_FILE, meta, header.resume or (0, 0))
        try:
            direct.apply(decoded or [])
        except BaseException:
            direct.abort()
            raise
        return direct

    def apply(self, items: list) -> None:
        for item in items:
            if isinstance(item, Record):  # not the trailer
                self.writers[item.disk].record(item)
                self._advance(item)

    def _record_progress(self) -> None:
        """Make everything so far durable, then say so: a broken connection resumes here.
        The fsync and the note run in the writer's thread after the writes they cover,
        while receiving goes on (replica/copywriter.py)."""
        disk, offset = self._at
        path, meta = self.progress_path, self.progress_meta
        assert path is not None and meta is not None  # set together by open(); _advance checks
        doc = json.dumps({**meta, "disk": disk, "offset": offset}).encode()
        for i, w in enumerate(self.writers):
            if i != disk:
                w.sync()  # earlier disks are complete (the log goes disk by disk)

        def durable() -> None:
            fsync_dir(self.folder)
            write_atomic(path, doc, 0o600)
        self.writers[disk].checkpoint(durable)
        self._unsynced = 0

    def write(self, pieces: list[bytes]) -> None:
        for piece in pieces:
            self.apply(self.decoder.feed(piece))

    def pull(self, source: RawLog) -> None:
        """Receive the rest of the log from a raw connection: each data record is read from
        the socket straight into its disk's write buffer (wire/codec.py ``pull``)."""
        def placed(item: Record) -> None:
            self.writers[item.disk].filled(item.length)  # verified, and in the buffer already
            self._advance(item)
        for item in self.decoder.pull(source.read_into, lambda d, o, n: self.writers[d].slot(o, n), placed):
            self.apply([item])

    def _advance(self, item: Record) -> None:
        self._at = (item.disk, item.offset + item.length)
        self._unsynced += item.length
        if self._unsynced >= PROGRESS_EVERY and self.progress_path is not None:
            self._record_progress()

    def finish(self) -> None:
        self.decoder.close()
        for w in self.writers:
            w.sync()
        self.abort()
        fsync_dir(self.folder)

    def abort(self) -> None:
        for w in self.writers:
            w.close()
        self.writers = []


def read_progress(path: Path) -> dict | None:
    """An initial copy's durable progress, or None (absent or unreadable: start over)."""
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    ok = (isinstance(doc, dict) and isinstance(doc.get("epoch"), str) and isinstance(doc.get("peer"), str)
          and all(isinstance(doc.get(k), int) and not isinstance(doc.get(k), bool) for k in ("seq", "disk", "offset")))
    return doc if ok else None

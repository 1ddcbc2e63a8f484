"""A delta's undo log written while the log itself is received (issue 18), instead of by the
applier after the acknowledgement (replica/apply.py ``write_undo``).

While the primary is still scanning and sending, the replica knows from each verified record
what the log will overwrite; the copy is at the log's base point and nothing writes it until
the log is acknowledged (no other log of the VM is received meanwhile, none is waiting to be
applied). So the old contents can be saved then: the kernel is asked to read them ahead
(``POSIX_FADV_WILLNEED``) as the records arrive, and they are read and encoded a few MiB
behind. The applier then finds the undo log complete and goes straight to the blocks.

It is only a faster way to the very file ``write_undo`` makes (each old byte saved once,
sizes first, never larger than what the disks hold), and it is kept only when it is
certainly right: it is built only when the copy is at a committed point that nothing waits
to change (``applied_seq == seq`` and the copy's recorded identity matches the opened
files), the files must be unchanged when the log ends (size, mtime, ctime, inode, device),
and it is renamed to its final name after the staged log's (a crash between the two leaves
a ``.part`` that recovery drops: the applier writes the undo log as before). An undo log
above the acknowledged sequence is never used: ``Staging.open`` and recovery delete it, as
the primary may resend that sequence with other contents.

Blocking code: runs in the receiving worker thread."""

from __future__ import annotations

import bisect
import os
from pathlib import Path

from ..fsutil import durable_rename
from ..wire import RECORD_RESIZE, Header, LogEncoder, Record
from .apply import save_range, undo_header
from .layout import VMDir

READ_BEHIND = 8 << 20   # old data read this far behind the records asked ahead
MAX_RANGES = 1 << 16    # more disjoint ranges than this: left to the applier (bounded memory)


def _identity(fd: int) -> tuple[int, int, int, int, int]:
    st = os.fstat(fd)
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev


class UndoAtReceipt:
    """``open``: None when the copy is not known to be the committed point the log builds on."""

    def __init__(self, final: Path, fds: list[int], header: Header):
        self.final = final
        self.part = final.with_name(final.name + ".part")
        self._fds = fds
        self._start = [_identity(fd) for fd in fds]
        self._old = [s[0] for s in self._start]
        self._enc = LogEncoder(undo_header(header, self._old), compress=True)
        self._out = open(self.part, "wb")  # noqa: SIM115 — closed by finish/abort
        self._saved: list[tuple[list[int], list[int]]] = [([], []) for _ in fds]  # disjoint [start, end)
        self._ranges = 0
        self._pending: list[tuple[int, int, int]] = []
        self._pending_bytes = 0
        self.usable = True
        self._out.write(self._enc.start())
        for i, d in enumerate(header.disks):  # sizes first: applying the undo restores them before data
            if d.size != self._old[i]:
                self._out.write(self._enc.resize(i, self._old[i]))

    @classmethod
    def open(cls, vmdir: VMDir, header: Header, disks: list[Path], recorded: list) -> UndoAtReceipt | None:
        """``recorded``: the copy's identities as the catalog recorded them at its last point."""
        if header.kind == "initial" or not recorded or len(disks) != len(header.disks):
            return None
        fds: list[int] = []
        try:
            for p in disks:
                fds.append(os.open(p, os.O_RDONLY))
            if [list(_identity(fd)[i] for i in (0, 1, 3)) for fd in fds] != [list(r) for r in recorded]:
                raise LookupError("the copy is not the recorded point")
            return cls(vmdir.undo_log(header.seq), fds, header)
        except (OSError, LookupError):
            for fd in fds:
                os.close(fd)
            vmdir.undo_log(header.seq).with_suffix(".undo.part").unlink(missing_ok=True)
            return None

    def records(self, items: list) -> None:
        """The verified items of the log so far: save what their records will overwrite."""
        if not self.usable:
            return
        for item in items:
            if not isinstance(item, Record):
                continue
            old = self._old[item.disk]
            end = old if item.kind == RECORD_RESIZE else min(item.offset + item.length, old)
            for a, b in self._claim(item.disk, item.offset, end):
                os.posix_fadvise(self._fds[item.disk], a, min(b - a, READ_BEHIND), os.POSIX_FADV_WILLNEED)
                self._pending.append((item.disk, a, b))
                self._pending_bytes += b - a
            if self._ranges > MAX_RANGES:
                self.abort()
                return
        if self._pending_bytes > 2 * READ_BEHIND:
            self._save(READ_BEHIND)

    def _claim(self, disk: int, start: int, end: int) -> list[tuple[int, int]]:
        """The parts of [start, end) not saved yet, now counted as saved."""
        if end <= start:
            return []
        starts, ends = self._saved[disk]
        if not starts or start >= ends[-1]:  # the usual case: records in increasing order
            if starts and start == ends[-1]:
                ends[-1] = end
            else:
                starts.append(start)
                ends.append(end)
                self._ranges += 1
            return [(start, end)]
        i = bisect.bisect_right(ends, start)  # the first saved range ending after start
        gaps, pos, j = [], start, i
        while j < len(starts) and starts[j] < end:
            if starts[j] > pos:
                gaps.append((pos, starts[j]))
            pos = max(pos, ends[j])
            j += 1
        if pos < end:
            gaps.append((pos, end))
        if j == i:  # overlaps nothing: a new range
            starts.insert(i, start)
            ends.insert(i, end)
            self._ranges += 1
        else:
            starts[i:j] = [min(start, starts[i])]
            ends[i:j] = [max(end, ends[j - 1])]
            self._ranges -= j - i - 1
        return gaps

    def _save(self, keep: int) -> None:
        """Read and encode the pending ranges, all but the last ``keep`` bytes of them."""
        done = 0
        for disk, a, b in self._pending:
            if self._pending_bytes <= keep:
                break
            for piece in save_range(self._enc, self._fds[disk], disk, a, b):
                self._out.write(piece)
            self._pending_bytes -= b - a
            done += 1
        del self._pending[:done]

    def finish(self) -> bool:
        """The log is complete: the undo log durable as ``.part``; False (and nothing left) when
        it cannot be used — the copy changed meanwhile, or it was given up."""
        if not self.usable:
            return False
        self._save(0)
        self._out.write(self._enc.finish())
        self._out.flush()
        os.fsync(self._out.fileno())
        if [_identity(fd) for fd in self._fds] != self._start:
            self.abort()
            return False
        return True

    def commit(self) -> None:
        """After the staged log's own rename: the undo log under its final name."""
        self._close()
        durable_rename(self.part, self.final)

    def _close(self) -> None:
        if not self._out.closed:
            self._out.close()
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def abort(self) -> None:
        self.usable = False
        self._close()
        self.part.unlink(missing_ok=True)
        self._pending, self._saved = [], []

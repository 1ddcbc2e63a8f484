"""Out-of-band initial replication (SPEC §3.4 `start-initial --export DIR`).

The initial copy is written as a change log to ``DIR/<vm>.rlog`` with a small
``DIR/<vm>.json`` that says whose it is; the media travel; the replica loads them with
`import-initial`. Meanwhile the primary waits in WaitingForStartResynchronize: its first
network cycle is a resync against what the replica imported, so only blocks changed
since the export cross the network.

The daemon usually runs as root and DIR may belong to someone else (a mounted disk, a
shared drop folder), who can plant links in it. So every file is created relative to the
folder's descriptor with O_CREAT|O_EXCL|O_NOFOLLOW, mode 0600, under a name nobody can
guess, and renamed over the final name (a rename replaces a link, never follows it); a
final name already taken is refused unless the operator said `--force`."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path

from ..errors import Conflict
from .producer import CycleProducer

_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def export_names(vm_name: str) -> tuple[str, str]:
    """The files an export of ``vm_name`` writes: the log, its metadata."""
    return f"{vm_name}.rlog", f"{vm_name}.json"


def check_target(folder: Path, vm_name: str, *, force: bool) -> None:
    """Refuse (Conflict, naming the file) when an export file is already in ``folder``,
    whatever it is (file, link, folder), unless ``force``."""
    if force:
        return
    for name in export_names(vm_name):
        if os.path.lexists(folder / name):
            raise Conflict(f"{folder / name} already exists: refusing to replace it",
                           hint="remove it, choose another folder, or add --force to replace it")


def _open_folder(folder: Path) -> int:
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    return os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def _write_new(dfd: int, final: str, write) -> None:
    """Create a new private file next to ``final`` (never an existing one, never through a
    link), ``write(f)`` it, fsync, and rename it over ``final``; nothing stays on failure."""
    tmp = f".{final}.{secrets.token_hex(8)}.part"
    fd = os.open(tmp, _CREATE, 0o600, dir_fd=dfd)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final, src_dir_fd=dfd, dst_dir_fd=dfd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dfd)
        raise
    os.fsync(dfd)


def export_initial(producer: CycleProducer, folder: Path, primary: str, *, force: bool = False) -> dict:
    """Write the producer's initial log into ``folder``; returns the metadata written.
    Raises Conflict when an export file is already there (and not ``force``): checked
    before anything is written (a file the folder's owner adds meanwhile is replaced, as a
    rename does, never written through)."""
    name = producer.vm.name
    log_name, meta_name = export_names(name)
    check_target(folder, name, force=force)

    def write_log(f) -> None:
        for batch in producer.batches():
            f.writelines(batch)
            producer.progress.sent += sum(len(b) for b in batch)

    dfd = _open_folder(folder)
    try:
        _write_new(dfd, log_name, write_log)
        meta = {"vm_id": producer.vm.id, "vm_name": name, "primary": primary, "epoch": producer.epoch,
                "seq": producer.seq, "bytes": producer.progress.sent, "data_bytes": producer.data_bytes}
        _write_new(dfd, meta_name, lambda f: f.write(json.dumps(meta, indent=1).encode()))
        return meta
    finally:
        os.close(dfd)

"""A replica copy whose file is gone (deleted by hand, a restore that missed it, a full
clean-up of the wrong folder).

Nothing can be applied to it or digested from it, and retrying cannot
bring it back: the replica says which file is missing (a log line, the relationship's
error, so health is Critical), refuses the primary's next log with "resync required"
naming the disk and this host, and when the resync asks for digests it recreates the file
empty at its recorded size (sparse: it reads as zeros). The primary then finds every block
of that file differing from its own disk and sends them, and only them: the other files'
digests still match. ``record`` writes the catalog (await it on the loop); the others touch
files (call them in a worker thread)."""

from __future__ import annotations

import os

from .. import log as logmod
from ..catalog import Catalog
from ..errors import StorageError
from ..fsutil import fsync_dir
from ..model import VM
from .layout import VMDir

log = logmod.get("replicad.replica")


def missing_files(vm: VM) -> list[int]:
    """Indexes (into ``vm.files()``) of the copy's files that do not exist."""
    return [i for i, p in enumerate(vm.files()) if not p.exists()]


def describe(vm: VM, index: int) -> str:
    """How an operator names file ``index`` of a VM: "disk 2 of 2 (b.img)"."""
    files = vm.files()
    if index >= len(vm.disks):
        role = vm.settings()[index - len(vm.disks)][0]
        what = {"config_file": "configuration file", "failover_network": "failover network file",
                "test_failover_network": "test failover network file"}[role]
        return f"{what} ({files[index].name})"
    return f"disk {index + 1} of {len(vm.disks)} ({files[index].name})"


def message(vm: VM, indexes: list[int], host: str) -> str:
    """The one line the primary and the replica's status show for missing files."""
    what = ", ".join(f"the replica copy of {describe(vm, i)}" for i in indexes)
    return f"{what} {'is' if len(indexes) == 1 else 'are'} missing on {host}"


def recreate(vm: VM, indexes: list[int], principal: str) -> None:
    """Create each missing file empty, at the size the copy last committed (a hole that
    reads as zeros), owner-only. The folder must still exist: a file is never created
    outside a folder that the copy already uses. Raises StorageError naming the file."""
    files = vm.files()
    for i in indexes:
        path = files[i]
        size = vm.disks[i].size if i < len(vm.disks) else 0
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(fd, size)
                os.fsync(fd)
            finally:
                os.close(fd)
            fsync_dir(path.parent)
        except OSError as e:
            raise StorageError(f"cannot recreate {path}: {e.strerror}") from None
        log.warning("replica.copy_recreated", vm=vm.name, peer=principal, file=str(path),
                    reason="the file was missing; it is empty now and the resync fills it from the primary")


def unmodified(before: list, now: list, recreated: list[int]) -> bool:
    """Whether the copy's files match their identities at the last point, the recreated
    ones aside (they held nothing to keep: they were gone)."""
    if not before:
        return True
    return all(b == n for i, (b, n) in enumerate(zip(before, now, strict=False)) if i not in recreated)


async def record(catalog: Catalog, vm: VM, gone: list[int], host: str, peer: str | None = None) -> None:
    """Name each missing file in a ``replica.copy_missing`` line and in the relationship's
    error (health Critical) until a resync brings them back. A catalog write: await it on
    the loop (its read-modify-write is staged before any other task runs)."""
    paths = [str(vm.files()[i]) for i in gone]
    for i, path in zip(gone, paths, strict=True):
        log.error("replica.copy_missing", vm=vm.name, vm_id=vm.id, peer=peer, file=path, disk=describe(vm, i),
                  result="nothing is applied to this copy until the primary's resync recreates the file from its "
                  "own disk (automatic at its next cycle)")
    rel = catalog.require_relationship(vm.id)
    rel.error = f"{message(vm, gone, host)}: {', '.join(paths)}; a resync from the primary recreates it"
    await catalog.put_relationship(rel)


def drop_logs(vmdir: VMDir, applied: int, received: int) -> None:
    """The staged logs above the applied point: they can never apply onto a missing file."""
    for seq in range(applied + 1, received + 1):
        vmdir.log(seq).unlink(missing_ok=True)

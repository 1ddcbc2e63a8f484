"""A VM's disk set on a primary: the disks `vm add --disk` registers (with their qcow2
backing chains), and `vm set --add-disk/--remove-disk` (or `apply -f` naming another disk
list) changing it — Hyper-V's `Set-VMReplication -ReplicatedDisks` (issue 20 item 3).

A changed set is carried by the VM's next cycle: the tracker finds each map by its file's
name (tracking/baselines.py), so a new disk has no baseline and the cycle ships all of its
data — its own initial copy — while the other disks ship their deltas; a removed disk is
simply not in the log. The replica applies the new set with the point (replica/disk_set.py).
A QEMU VM's disks are block nodes of its process: changing them is refused (add the node to
the process, then `vm remove` and `vm add --qemu` again)."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Collection
from pathlib import Path

from .. import log as logmod
from ..errors import Conflict, NotFound, Refused, ReplicadError, UsageError
from ..images import BackingRefused, ImageError, backing_chain, disk_format
from ..model import VM, Disk, Relationship, ReplicationState, valid_disk_name
from ..wire import MAX_DISKS

log = logmod.get("replicad.vms")

# states in which the files a cycle reads are pinned by an interrupted transfer or a resync
# that compares the replica's files one for one, or by a prepared failover
_FIXED = {ReplicationState.INITIAL_IN_PROGRESS: "its initial copy is in progress (an interrupted copy resumes "
          "disk by disk)", ReplicationState.WAITING_FOR_RESYNC: "it waits for a resynchronization",
          ReplicationState.RESYNCHRONIZING: "it is being resynchronized",
          ReplicationState.RESYNC_SUSPENDED: "a resynchronization of it is suspended half way",
          ReplicationState.PREPARED_FOR_FAILOVER: "it is prepared for a planned failover"}


async def register_disks(vm_name: str, paths: list[str], allowed: tuple[Path, ...], taken: set[str],
                         known: Collection[str] = frozenset()) -> tuple[list[Disk], list[str]]:
    """The disks ``paths`` name, each followed by its qcow2 backing chain (a parent already
    in ``known`` is not registered again). ``taken``: the file names in use (replica copies
    are named after the file), extended with the new ones. Returns the disks and warnings."""
    disks: list[Disk] = []
    warnings: list[str] = []

    async def register(path: Path, what: str) -> None:
        # a file that is missing or wrong is a failed request (exit 1), not a usage error
        try:
            st = await asyncio.to_thread(os.stat, path)
        except FileNotFoundError as e:
            raise NotFound(f"{what} {path}: {e.strerror}") from None
        except OSError as e:
            raise ReplicadError(f"{what} {path}: {e.strerror}") from None
        if not stat.S_ISREG(st.st_mode):  # os.stat follows links, as Path.is_file does
            raise ReplicadError(f"{what} {path} is not a regular file")
        if not valid_disk_name(path.name):
            raise UsageError(f"{what} file name {path.name!r}: use letters, digits, '.', '_', '-'")
        if path.name in taken:
            raise UsageError(f"two files named {path.name}: replica copies are named after the file")
        taken.add(path.name)
        disks.append(Disk(str(path), st.st_size, await asyncio.to_thread(disk_format, path)))

    for p in paths:
        path = Path(p)
        if not path.is_absolute():
            raise UsageError(f"disk path must be absolute: {p}")
        await register(path, "disk")
        try:
            chain = await asyncio.to_thread(backing_chain, path, allowed)
        except BackingRefused as e:
            log.warning("vm.backing_refused", vm=vm_name, disk=str(path), backing_file=str(e.backing), reason=str(e))
            raise Refused(str(e)) from None
        except (ImageError, OSError) as e:
            raise ReplicadError(str(e)) from None
        child = path
        for b in chain:  # the differencing disk's parents travel with it
            if str(b.path) not in {d.path for d in disks} | set(known):
                await register(b.path, f"backing file of {child.name}:")
            if b.name != b.path.name:
                warnings.append(f"{child.name} names its backing file as {b.name!r}; on the replica every file "
                                f"sits in one folder, so after a failover run `qemu-img rebase -u -b {b.path.name} "
                                f"-F qcow2` on {child.name}'s copy (or create it with a relative name)")
            child = b.path
    return disks, warnings


def _paths(doc: dict, key: str) -> list[str]:
    v = doc.get(key) or []
    if not isinstance(v, list) or not all(isinstance(p, str) and p for p in v):
        raise UsageError(f"{key.replace('_', '-')}: a list of disk paths")
    for p in v:
        if not Path(p).is_absolute():
            raise UsageError(f"disk path must be absolute: {p}")
    return v


async def change_disks(vm: VM, rel: Relationship | None, doc: dict,
                       allowed: tuple[Path, ...]) -> tuple[list[str], list[str], list[str]] | None:
    """`vm set --add-disk/--remove-disk` (``add_disks``, ``remove_disks``) or `apply -f`'s
    whole list (``disks``: these and their backing chains, nothing else). Changes ``vm.disks``
    in place; the caller stores it. Returns the disks added (with their backing files) and
    removed, and warnings; None when nothing changes."""
    add, remove = _paths(doc, "add_disks"), _paths(doc, "remove_disks")
    have = [d.path for d in vm.disks]
    if "disks" in doc:
        wanted = _paths(doc, "disks")
        if not wanted:
            raise UsageError("disks: a VM keeps at least one disk")
        add += [p for p in wanted if p not in have]
        chains = await asyncio.to_thread(_chains, wanted, allowed)
        remove += [p for p in have if p not in wanted and p not in chains]
    add = [p for p in dict.fromkeys(add) if p not in have]  # `apply` saying it again changes nothing
    remove = list(dict.fromkeys(remove))
    if not add and not remove:
        return None
    if vm.qemu:
        raise UsageError(f"{vm.name} is a --qemu VM: its disks are the block nodes of its process, and "
                         "--add-disk/--remove-disk does not change them",
                         hint="`replicad vm remove` it and `vm add --qemu` it again with the new nodes")
    if rel is not None and rel.role != "primary":
        raise Conflict(f"{vm.name} is a replica here: its disks follow its primary's",
                       hint="change the disks on the primary; the next cycle brings the change")
    if rel is not None and rel.state in _FIXED:
        raise Conflict(f"{vm.name}'s disks cannot change now: {_FIXED[rel.state]}",
                       hint="change them once it is Replicating (or Suspended)")
    for p in remove:
        if p not in have:
            raise NotFound(f"{vm.name} has no disk {p}", hint=f"see `replicad vm get {vm.name} -o list`")
    kept = [d for d in vm.disks if d.path not in remove]
    if not kept and not add:
        raise UsageError(f"{vm.name} would have no disk left; a VM keeps at least one")
    parents = await asyncio.to_thread(_chains, [d.path for d in kept], allowed)
    if needed := [p for p in remove if p in parents]:
        raise Conflict(f"{needed[0]} is the backing file of another disk of {vm.name}; remove that disk too")
    taken = {Path(p).name for p in [d.path for d in kept] + [p for _, p in vm.settings()]}
    new, warnings = await register_disks(vm.name, add, allowed, taken, {d.path for d in kept})
    if len(kept) + len(new) + len(vm.settings()) > MAX_DISKS:  # what one change log can name (wire/header.py)
        raise UsageError(f"{vm.name} would have {len(kept) + len(new) + len(vm.settings())} files; "
                         f"a VM has at most {MAX_DISKS}")
    vm.disks = kept + new
    log.info("vm.disks_changed", vm=vm.name, added=[d.path for d in new], removed=remove,
             reason="the next cycle carries the change: a new disk gets its own initial copy, a removed one "
                    "is dropped from the replica's next point" if rel is not None else "not replicated yet")
    return [d.path for d in new], remove, warnings


def _chains(paths: list[str], allowed: tuple[Path, ...]) -> set[str]:
    """The backing files of ``paths`` (blocking)."""
    out: set[str] = set()
    for p in paths:
        try:
            out |= {str(b.path) for b in backing_chain(Path(p), allowed)}
        except (BackingRefused, ImageError, OSError):
            continue  # judged when the disk itself is registered
    return out

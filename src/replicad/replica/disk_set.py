"""A replica VM's file set across points (issue 20 item 3: `vm set --add-disk/--remove-disk`
on the primary, Hyper-V's `ReplicatedDisks`).

Every change log names its point's whole file set, in ``VM.files()`` order: disks, then the
failover network files, then the configuration file. A delta log whose disks differ from
the copy's changes the set with its point: a disk new in the log is created empty (sparse)
and the log carries all of its data; a disk the log leaves out is dropped once the point is
committed. Files are matched by name, never by position: a record's disk index is an index
into its own log's list. The log's names are the primary's, checked by the wire decoder
(``valid_disk_name``: no separator, no leading dot), and a new file is only ever made
inside the VM's own ``disks`` folder, refusing whatever already sits at its name unless it
is a plain file of this daemon's with no other link (replica/seeding.py's checks): a peer
cannot make the replica write anywhere else, nor through a link it planted.

Older points keep their own sets: the undo log of a log that changed the set is itself a
log of the previous point's set (replica/apply.py ``write_undo``), so rolling back applies
the same rule — what it does not name is dropped, what it names and is missing is made.
A failover to a point before a disk was added has no such disk; one to a point before a
removal gets the removed disk's bytes back. Configuration and failover network files are
fixed while a VM is replicated (api/vm_files.py): a log that changes them asks for a resync.

Blocking helpers: run in worker threads."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ResyncRequired, WireError
from ..model import VM, valid_disk_name
from ..wire import Header
from .layout import VMDir
from .seeding import file_problem

Place = Callable[[str], Path]


@dataclass(frozen=True)
class FileSet:
    """A log's files as this replica keeps them."""

    paths: list[Path]                                 # one per entry of the log's header
    added: list[int] = field(default_factory=list)    # header indexes of files new in the log
    removed: list[Path] = field(default_factory=list)  # the copy's disks the log leaves out

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed)


def settings_count(vm: VM) -> int:
    return len(vm.settings())


def plan(vm: VM, vmdir: VMDir, header: Header) -> FileSet:
    """Where each file of ``header``'s log lives here, and how the log changes the copy's
    disk set. Raises ResyncRequired when the log changes the configuration or network
    files, WireError when a new name could leave the VM's folder."""
    if header.config != bool(vm.config_file) or header.networks != vm.network_roles():
        raise ResyncRequired("the VM's configuration or failover network files changed")
    names = [d.name for d in header.disks]
    n = settings_count(vm)
    current = vm.copy_names()
    if n and names[-n:] != current[-n:]:
        raise ResyncRequired("the VM's configuration or failover network files changed")
    have = dict(zip(current, vm.files(), strict=True))
    paths: list[Path] = []
    added: list[int] = []
    for i, name in enumerate(names):
        if name in have:
            paths.append(have[name])
            continue
        paths.append(new_path(vmdir.disks, name))
        added.append(i)
    removed = [have[c] for c in current[:len(current) - n] if c not in names]
    return FileSet(paths, added, removed)


def new_path(folder: Path, name: str) -> Path:
    """A new file's path in ``folder``: only a plain name, only inside it."""
    p = folder / name
    if not valid_disk_name(name) or p.parent != folder:
        raise WireError(f"change-log header: disk name {name[:64]!r} is not a plain file name")
    return p


def check_new(files: FileSet) -> None:
    """Before a log that adds files is acknowledged: whatever sits at a new file's name must
    be a plain file of this daemon's with no other link (or nothing). Raises WireError."""
    for i in files.added:
        p = files.paths[i]
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            continue
        why = file_problem(st)
        if why is not None:
            raise WireError(f"the log adds disk {p.name}, but {p} {why}: the replica writes no disk there")


def open_new(path: Path) -> int:
    """Open a file a log adds, empty: made here, or left by an earlier attempt at the same log
    (a plain file of this daemon's, no other link); never through a link."""
    path.parent.mkdir(mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        why = file_problem(os.fstat(fd))
        if why is not None:
            raise WireError(f"{path.name} {why}: the replica does not write a disk a log adds there")
        os.ftruncate(fd, 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def drop(paths: list[Path]) -> None:
    """Delete files the copy's committed point does not have (idempotent)."""
    for p in paths:
        p.unlink(missing_ok=True)
    for folder in {p.parent for p in paths}:
        if folder.exists():
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def placer(vm: VM, vmdir: VMDir) -> Place:
    """Where a file of this VM named ``name`` lives: the existing file of that name, or a new
    one in the VM's disks folder."""
    have = dict(zip(vm.copy_names(), vm.files(), strict=True))
    return lambda name: have.get(name) or new_path(vmdir.disks, name)


def strays(vmdir: VMDir, files: list[Path]) -> list[Path]:
    """Disks of an earlier set still in the VM's disks folder: a crash came between the commit
    that dropped them and their deletion. (Names with a leading dot are failover copies'.)"""
    keep = set(files)
    if not vmdir.disks.is_dir():
        return []
    return [p for p in vmdir.disks.iterdir() if not p.name.startswith(".") and p not in keep
            and not p.is_symlink() and p.is_file()]

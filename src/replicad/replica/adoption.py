"""How a VM becomes a replica VM here: by its first initial log (the receipt registers it,
replica/receiving.py), by adopting a copy already in this server's storage (`seed`, for
`start-initial --use-existing`: replica/seeding.py), or by importing an initial copy
exported to media (`import-initial`)."""

from __future__ import annotations

import asyncio
import json
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from .. import log as logmod
from .. import workers
from ..auth.authorize import Grant, authorize
from ..catalog import Catalog
from ..errors import Conflict, UsageError, WireError
from ..fsutil import durable_rename, fsync_file
from ..model import (
    NETWORK_ROLES,
    VM,
    Disk,
    Relationship,
    ReplicationMode,
    ReplicationState,
    VMState,
    split_files,
    valid_disk_name,
    valid_fqdn,
    valid_vm_name,
)
from ..server_settings import ServerSettings
from ..wire import Header
from .admission import Admission
from .applier import Applier
from .apply import read_log
from .layout import VMDir
from .seeding import SeedRefused, adopt, seed_sizes

log = logmod.get("replicad.replica")


class Adoption:
    def __init__(self, catalog: Catalog, state_dir: Path, admission: Admission, applier: Applier,
                 receive_lock: Callable[[str], asyncio.Lock]):
        self.catalog = catalog
        self.state_dir = state_dir
        self.admission = admission
        self.applier = applier
        self._receive_lock = receive_lock  # one receipt (or adoption) at a time per VM

    async def reset_for_initial(self, rel: Relationship) -> None:
        """A restarted initial replication: the old chain is dead; drop its staged and undo
        logs, never under the feet of an apply in progress."""
        old = VMDir.of(rel.storage, rel.vm_id)
        def drop() -> None:
            for p in (old.logs, old.undo):
                shutil.rmtree(p, ignore_errors=True)
        async with self.applier.lock(rel.vm_id):
            await workers.RECEIVE.run(drop)
        rel.applied_seq = rel.seq = 0
        await self.catalog.put_relationship(rel)

    async def create_replica(self, grant: Grant, header: Header, storage: Path,
                             old: Relationship | None) -> Relationship:
        """Record the replica VM of a verified initial log (or reset it for a new epoch)."""
        return await self._register(grant, header.vm_id, header.vm_name, [(d.name, d.size) for d in header.disks],
                                    header.config, storage, header.epoch, old, how="initial log",
                                    extended=header.extended, networks=header.networks)

    async def _register(self, grant: Grant, vm_id: str, name: str, files: list[tuple[str, int]], config: bool,
                  storage: Path, epoch: str, old: Relationship | None, *, how: str,
                  extended: bool = False, networks: tuple[str, ...] = ()) -> Relationship:
        vmdir = VMDir.of(storage, vm_id)
        disks, settings = split_files(files, config, networks)
        mode = ReplicationMode.EXTENDED_REPLICA if extended else ReplicationMode.REPLICA
        vm = VM(id=vm_id, name=name, mode=mode, state=VMState.OFF,  # a replica VM never runs here unless failed over
                disks=[Disk(str(vmdir.disk(n)), size, "raw") for n, size in disks],
                ).with_settings({role: vmdir.disk(n) for role, (n, _) in settings.items()})
        rel = Relationship(vm_id=vm_id, role="replica", state=ReplicationState.INITIAL_IN_PROGRESS,
                           primary_server=grant.principal, trust_group=grant.trust_group, storage=str(storage),
                           epoch=epoch, seq=0, applied_seq=0, extended=extended)
        if old is not None:
            rel.stats = old.stats
        await self.catalog.put_vm_and_relationship(vm, rel)
        await self.admission.release(vm_id)  # the relationship binds the VM to its primary from now on
        await self.catalog.audit(grant.principal, "replica.created", f"{name} ({vm_id}) in {storage} from {how}")
        log.info("replica.vm_created", vm=name, peer=grant.principal, storage=str(vmdir.root),
                 trust_group=grant.trust_group, source=how)
        return rel

    async def seed(self, grant: Grant, vm_id: str, doc: dict) -> dict:
        """Adopt a copy already in this server's storage as the replica of a primary's VM
        (`start-initial --use-existing`): the files in ``<storage>/<vm name>/`` named like the
        VM's files become the replica copy, at point 0; the primary then resyncs against
        their digests. Only storage the primary's authorization entry grants is looked at."""
        principal = grant.principal
        name, files, config = doc.get("vm_name"), doc.get("files"), doc.get("config", False)
        networks = doc.get("networks", [])
        if (not isinstance(name, str) or not valid_vm_name(name) or not isinstance(files, list)
                or not 0 < len(files) <= 64 or not all(isinstance(f, str) and valid_disk_name(f) for f in files)
                or len(set(files)) != len(files) or not isinstance(config, bool) or (config and len(files) < 2)
                or not isinstance(networks, list) or networks != [r for r in NETWORK_ROLES if r in networks]
                or len(files) < 1 + len(networks) + config):
            raise UsageError("malformed seed request")
        try:
            uuid.UUID(vm_id)
        except ValueError:
            raise UsageError("malformed VM id") from None
        storage = Path(grant.storage)
        async with self._receive_lock(vm_id):
            self.admission.check(grant, vm_id, name, held=vm_id)
            rel = self.catalog.relationship(vm_id)
            if rel is not None:
                if rel.role == "replica" and rel.applied_seq == 0:
                    return {"vm_id": vm_id, "found": None, "adopted": "already"}  # a retried request
                raise Conflict(f"this replica server already has VM {name} ({vm_id})")
            source = storage / name
            vmdir = VMDir.of(storage, vm_id)
            sizes = await asyncio.to_thread(seed_sizes, source, files)
            self.admission.check_quota(grant, vm_id, name, list(zip(files, sizes, strict=True)))
            try:
                found = await asyncio.to_thread(adopt, source, vmdir, files)
            except SeedRefused as e:
                log.warning("seed.refused", vm=name, peer=principal, file=str(e.path), reason=str(e))
                raise
            if not found:
                raise Conflict(f"no existing copy of {name} in {source} on {grant.principal}'s storage",
                               hint=f"put the copy's files ({', '.join(files)}) in {source} on the replica "
                                    "server, or start a normal initial replication")
            sizes = [vmdir.disk(f).stat().st_size for f in files]
            await self._register(grant, vm_id, name, list(zip(files, sizes, strict=True)), config, storage, "", None,
                                 how=f"existing copy {source}", networks=tuple(networks))
        log.info("replica.seeded", vm=name, peer=principal, found=found, created_empty=len(files) - len(found),
                 reason="the primary's first cycle compares digests and ships only the blocks that differ")
        return {"vm_id": vm_id, "found": found}

    async def import_initial(self, name: str, folder: Path, actor: str) -> tuple[VM, Relationship]:
        """`import-initial`: load an exported initial copy from media as if it had arrived
        from its primary; authorization entries decide storage and trust group as usual."""
        try:
            meta = json.loads((folder / f"{name}.json").read_text())
            primary, vm_id = str(meta["primary"]).lower(), str(meta["vm_id"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UsageError(f"{folder} holds no exported copy of {name} ({e})") from None
        if not valid_fqdn(primary) or meta.get("vm_name") != name:
            raise UsageError(f"{folder / (name + '.json')} does not describe {name}")
        s = ServerSettings.load(self.catalog, self.state_dir)
        grant = authorize(primary, enabled=s.enabled, allow_any=s.allowed_from_any_server,
                          default_storage=Path(s.default_storage), entries=self.catalog.entries())
        src = folder / f"{name}.rlog"
        try:
            header = await asyncio.to_thread(_verify_log, src)
        except OSError as e:
            raise UsageError(f"cannot read {src}: {e.strerror}") from None
        if header.vm_id != vm_id or header.vm_name != name or header.kind != "initial":
            raise WireError(f"{src} is not the initial copy of {name}")
        async with self._receive_lock(vm_id):
            self.admission.check(grant, vm_id, name, held=vm_id)  # the log line names the owner
            rel = self.catalog.relationship(vm_id)
            if rel is not None:
                await self.reset_for_initial(rel)
            vmdir = VMDir.of(grant.storage, vm_id)
            await asyncio.to_thread(_stage_copy, src, vmdir, header.seq)
            rel = await self.create_replica(grant, header, Path(grant.storage), rel)
            rel.seq, rel.epoch = header.seq, header.epoch
            await self.catalog.put_relationship(rel)
        await self.catalog.audit(actor, "replica.imported", f"{name} ({vm_id}) from {src}")
        log.info("replica.imported", vm=name, primary=primary, folder=str(folder),
                 reason="the primary's first network cycle will be a resync shipping only what changed")
        self.applier.wake(vm_id)
        return self.catalog.require_vm(vm_id), rel


def _verify_log(path: Path) -> Header:
    """Decode a whole log from media (checksums, digest, bounds); returns its header."""
    header = None
    for item in read_log(path):
        if header is None and isinstance(item, Header):  # the decoder's first item
            header = item
    if header is None:
        raise WireError(f"{path} holds no change-log header")
    return header


def _stage_copy(src: Path, vmdir: VMDir, seq: int) -> None:
    vmdir.create()
    part = vmdir.log_part(seq)
    shutil.copyfile(src, part)
    fsync_file(part)
    durable_rename(part, vmdir.log(seq))

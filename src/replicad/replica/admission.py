"""Who may send what to this replica server, decided before anything is spent on it
(DESIGN §5; issue 13 items 3, 5 and 7).

A change log's request is judged from the request alone — the authenticated principal,
the listener's auth type, the VM id in the URL — before any VM lock is taken and before
any byte of the log is read (docs/security.md, "Authorization"): a peer that will be
refused never holds a lock, a thread or a file. The same checks run again under the VM's
lock against the log's header (replica/receiving.py), with its name and sizes, since the
catalog may change between.

A VM id and its name belong to the primary — principal *and* trust group — whose log was
first admitted for them. While that VM's first copy is pending (being received, or
interrupted with durable progress to resume from) a *claim* in the catalog records it;
once the copy is committed, the replica VM's relationship does. Everything a primary sends
about a VM (logs, status, digests, a seed) is checked against that owner first, before the
VM's state is looked at:

- its owner, from the trust group it was created under: admitted;
- its owner, now matched by an entry of another trust group: refused, saying so (it is
  its own VM);
- anyone else — another group, or another host of the same group: refused with one answer
  that names only what the caller sent and who it is, identical whether the id or the name
  is taken, whether the copy is committed or pending, and whatever the owner's group. The
  log line (``admission.refused``) names the owner for this host's operator.

VM names are unique per replica server (the CLI addresses VMs by name), so a refusal does
tell a primary that a name it tried is taken here; never by whom, nor anything else.

A claim lasts as long as its pending copy: it goes when the replica VM is created, when a
first log fails and leaves nothing to resume, or — found stale — when its folder has no
durable progress and no log for it is being received. Quotas (``auth-entry
--max-disk-size/--max-storage``) are checked from a log's header, before anything is
written."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .. import log as logmod
from ..auth.authorize import Grant, authorize, best_entry
from ..catalog import Catalog
from ..errors import Busy, Conflict, Refused
from ..model import VMClaim
from ..server_settings import ServerSettings
from ..times import utcnow
from ..transport.client import LOGS_PER_REPLICA
from ..units import format_size
from .layout import VMDir

log = logmod.get("replicad.replica")


class LogSlot:
    """One of a principal's concurrent logs; ``release`` is idempotent."""

    def __init__(self, counts: dict[str, int], principal: str):
        self._counts, self.principal = counts, principal
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._counts[self.principal] -= 1
            if not self._counts[self.principal]:
                del self._counts[self.principal]


@dataclass(frozen=True)
class Owner:
    """Whom a VM id or name belongs to on this host."""

    principal: str        # the primary (for a local VM: the host it replicates to, if any)
    trust_group: str | None
    vm_id: str
    name: str
    state: str            # "replica" | "pending" | "local"


def _same(a: str, b: str) -> bool:
    return a.lower() == b.lower()


class Admission:
    def __init__(self, catalog: Catalog, state_dir: Path, receiving: Callable[[str], bool],
                 logs_per_peer: int = LOGS_PER_REPLICA):
        """``receiving(vm_id)``: a log for that VM is being received right now."""
        self.catalog = catalog
        self.state_dir = state_dir
        self._receiving = receiving
        self.logs_per_peer = logs_per_peer
        self._logs: dict[str, int] = {}  # principal -> logs being received now, both listeners

    def log_slot(self, principal: str) -> LogSlot:
        """A slot for one more log from ``principal``, or Busy (429) when it already sends
        ``logs_per_peer`` — the primary's own sender never sends more at once to one
        replica server (transport/client.py), so only a misbehaving peer meets this. The
        caller releases the slot before it answers."""
        if self._logs.get(principal, 0) >= self.logs_per_peer:
            raise Busy(f"{principal} already sends {self.logs_per_peer} change logs to this replica server; "
                       "try again when one is done")
        self._logs[principal] = self._logs.get(principal, 0) + 1
        return LogSlot(self._logs, principal)

    def grant(self, principal: str, auth: str) -> Grant:
        """What ``principal`` may do here over ``auth``: storage, trust group, quotas (raises Refused)."""
        s = ServerSettings.load(self.catalog, self.state_dir)
        if s.enabled and not s.accepts(auth):
            raise Refused(f"{principal} refused: this replica server does not accept {auth} authentication")
        return authorize(principal, enabled=s.enabled, allow_any=s.allowed_from_any_server,
                         default_storage=Path(s.default_storage), entries=self.catalog.entries())

    def names(self, principal: str) -> bool:
        """Whether an authorization entry — or `allowed_from_any_server` on an enabled
        server — names ``principal``: a host this server has a use for."""
        s = ServerSettings.load(self.catalog, self.state_dir)
        return (s.enabled and s.allowed_from_any_server) or best_entry(self.catalog.entries(), principal) is not None

    def log_request(self, principal: str, auth: str, vm_id: str) -> Grant:
        """May ``principal`` send a log for ``vm_id`` at all? From the request alone, before
        any lock: raises Refused (not authorized; the id is another primary's) or Conflict
        (the id is one of this host's own VMs, told to the host it replicates to)."""
        grant = self.grant(principal, auth)
        self.check(grant, vm_id)
        return grant

    # who owns what ----------------------------------------------------------------------
    def owner_of_id(self, vm_id: str, *, held: str | None = None) -> Owner | None:
        """The owner of ``vm_id`` here, or None. ``held``: the VM id whose receive lock the
        caller holds (so a claim on it is not in flight for anyone else)."""
        rel = self.catalog.relationship(vm_id)
        vm = self.catalog.vm_by_id(vm_id)
        if rel is not None and rel.role == "replica":
            return Owner(rel.primary_server, rel.trust_group, vm_id, vm.name if vm else "", "replica")
        if vm is not None:
            partner = rel.replica_server if rel is not None and rel.role == "primary" else ""
            return Owner(partner, None, vm_id, vm.name, "local")
        claim = self.catalog.claim_by_id(vm_id)
        if claim is None or self._expire_if_stale(claim, held):
            return None
        return Owner(claim.principal, claim.trust_group, vm_id, claim.name, "pending")

    def owner_of_name(self, name: str, *, held: str | None = None) -> Owner | None:
        vm = self.catalog.vm_by_name(name)
        if vm is not None:
            return self.owner_of_id(vm.id, held=held)
        claim = self.catalog.claim_by_name(name)
        if claim is None or self._expire_if_stale(claim, held):
            return None
        return Owner(claim.principal, claim.trust_group, claim.vm_id, claim.name, "pending")

    def _expire_if_stale(self, claim: VMClaim, held: str | None) -> bool:
        """Drop a claim whose pending copy is gone: no durable progress, nothing in flight."""
        in_flight = claim.vm_id != held and self._receiving(claim.vm_id)
        if in_flight or VMDir.of(claim.storage, claim.vm_id).progress.exists():
            return False
        self.catalog.remove_claim_later(claim.vm_id)  # need not be durable: a stale claim is dropped again
        log.info("admission.claim_expired", vm=claim.name, vm_id=claim.vm_id, owner=claim.principal,
                 reason="its first copy left nothing to resume")
        return True

    # decisions --------------------------------------------------------------------------
    def check(self, grant: Grant, vm_id: str, name: str | None = None, *, held: str | None = None,
              partner_ok: bool = False) -> None:
        """Raise unless ``grant``'s principal may act on VM ``vm_id`` (named ``name`` in its
        request, when it names one). Call before anything about the VM is revealed.
        ``partner_ok``: a read by the host a local VM replicates to is let through."""
        owner = self.owner_of_id(vm_id, held=held)
        if owner is not None:
            if partner_ok and owner.state == "local" and owner.principal and _same(owner.principal, grant.principal):
                return
            self._judge(grant, owner, vm_id, name, "id")
        if name is not None:
            other = self.owner_of_name(name, held=held)
            if other is not None and other.vm_id != vm_id:
                if _same(other.principal, grant.principal) and other.trust_group == grant.trust_group:
                    raise Conflict(f"{grant.principal} already replicates a different VM named {name} to this "
                                   f"server (id {other.vm_id})", hint="give one of the two VMs another name")
                self._refuse(grant, other, vm_id, name, "name")

    def _judge(self, grant: Grant, owner: Owner, vm_id: str, name: str | None, by: str) -> None:
        if owner.state == "local":
            if owner.principal and _same(owner.principal, grant.principal):  # its own replica server
                raise Conflict(f"VM {name or owner.name} ({vm_id}) exists on this host and is not a replica")
            self._refuse(grant, owner, vm_id, name, by)
        if not _same(owner.principal, grant.principal):
            self._refuse(grant, owner, vm_id, name, by)
        if owner.trust_group != grant.trust_group:  # its own VM, but its entry's group changed
            log.warning("replica.refused", vm=owner.name, peer=grant.principal, reason="trust group mismatch",
                        vm_group=owner.trust_group, peer_group=grant.trust_group)
            raise Refused(f"{grant.principal} (trust group {grant.trust_group}) may not write to VM "
                          f"{owner.name or name}, created under another trust group")

    @staticmethod
    def _refuse(grant: Grant, owner: Owner, vm_id: str, name: str | None, by: str) -> None:
        log.warning("admission.refused", peer=grant.principal, peer_group=grant.trust_group, vm=name, vm_id=vm_id,
                    owner=owner.principal, owner_group=owner.trust_group, owner_vm=owner.name,
                    owner_vm_id=owner.vm_id, owner_state=owner.state,
                    reason=f"the VM {by} belongs to another primary")
        # the same words whether the id or the name is taken, and whether the request's head
        # (id only) or the log's header (id and name) was refused: nothing tells which
        raise Refused(f"{grant.principal} (trust group {grant.trust_group}) may not replicate VM {vm_id} to this "
                      "server: that VM or its name belongs to another primary")

    # quotas (auth-entry --max-disk-size / --max-storage) -------------------------------
    def check_quota(self, grant: Grant, vm_id: str, name: str, files: list[tuple[str, int]]) -> None:
        """Refuse (before anything is written) a VM whose files, as ``files`` (name, size)
        declares them, break ``grant``'s quotas. A log that does not grow what the VM
        declares is never refused: a lowered quota stops growth, not replication."""
        if grant.max_disk_size is None and grant.max_storage is None:
            return
        total = sum(n for _, n in files)
        had = self._declared_files(vm_id)
        before = sum(had.values())
        for f, n in files:
            if grant.max_disk_size is not None and n > grant.max_disk_size and n > had.get(f, 0):
                self._over(grant, name, vm_id, "max-disk-size", grant.max_disk_size, n,
                           f"any one disk may be at most {format_size(grant.max_disk_size)}; {f} of {name} "
                           f"declares {format_size(n)}")
        if grant.max_storage is not None and total > before:
            used = sum(self._declared(other) for other in self._entry_vms(grant) if other != vm_id)
            if used + total > grant.max_storage:
                self._over(grant, name, vm_id, "max-storage", grant.max_storage, used + total,
                           f"its VMs here may declare {format_size(grant.max_storage)} together; with {name} "
                           f"({format_size(total)}) they would declare {format_size(used + total)}")

    def _declared_files(self, vm_id: str) -> dict[str, int]:
        """What a VM's files declare here, by file name: a replica VM's disks and
        configuration file, or a pending first copy's total (under the name "")."""
        vm = self.catalog.vm_by_id(vm_id)
        if vm is None:
            claim = self.catalog.claim_by_id(vm_id)
            return {"": claim.bytes} if claim is not None else {}
        out = {Path(d.path).name: d.size for d in vm.disks}
        for _, path in vm.settings():  # the configuration and failover network files
            try:
                out[Path(path).name] = os.stat(path).st_size
            except OSError:
                pass
        return out

    def _declared(self, vm_id: str) -> int:
        return sum(self._declared_files(vm_id).values())

    def _entry_vms(self, grant: Grant) -> set[str]:
        """The replica VMs (and pending first copies) of the primaries ``grant``'s entry matches."""
        entries = self.catalog.entries()

        def mine(principal: str) -> bool:
            e = best_entry(entries, principal)
            return e is not None and e.primary == grant.entry
        ids = {r.vm_id for r in self.catalog.relationships() if r.role == "replica" and mine(r.primary_server)}
        return ids | {c.vm_id for c in self.catalog.claims() if mine(c.principal)}

    @staticmethod
    def _over(grant: Grant, name: str, vm_id: str, quota: str, limit: int, wanted: int, why: str) -> None:
        log.warning("quota.refused", peer=grant.principal, vm=name, vm_id=vm_id, entry=grant.entry, quota=quota,
                    limit=limit, wanted=wanted, reason=why)
        raise Refused(f"{grant.principal} is over its quota on this server (--{quota} of authorization entry "
                      f"{grant.entry}): {why}", hint="ask the replica server's operator to raise it "
                      "(`replicad auth-entry set`)")

    # claims -----------------------------------------------------------------------------
    async def claim(self, grant: Grant, vm_id: str, name: str, storage: Path, declared: int = 0) -> None:
        """Bind ``vm_id`` and ``name`` to ``grant``'s primary for a first copy (idempotent for
        its owner). Raises like ``check`` when another claimed either meanwhile."""
        existing = self.catalog.claim_by_id(vm_id)
        if existing is not None and _same(existing.principal, grant.principal) and existing.name == name \
                and existing.trust_group == grant.trust_group:
            if existing.bytes != declared:  # a new attempt may declare other sizes
                await self.catalog.replace_claim(VMClaim(vm_id, name, grant.principal, grant.trust_group,
                                                         str(storage), existing.since, declared))
            return
        c = VMClaim(vm_id, name, grant.principal, grant.trust_group, str(storage), utcnow(), declared)
        if not await self.catalog.add_claim(c):
            self.check(grant, vm_id, name, held=vm_id)  # who won the race (or a stale claim, now gone)
            if not await self.catalog.add_claim(c):
                raise Conflict(f"VM {name} ({vm_id}) is being claimed by another request; try again")
        log.info("admission.claimed", vm=name, vm_id=vm_id, peer=grant.principal, trust_group=grant.trust_group,
                 reason="the first log admitted binds this VM id and name to its primary")

    async def release(self, vm_id: str) -> None:
        await self.catalog.remove_claim(vm_id)

    async def recover(self) -> list[VMClaim]:
        """At start: claims of a committed VM are done; claims whose copy left no durable
        progress are dropped. Returns the dropped ones (their folders are leftovers)."""
        dropped = []
        for c in self.catalog.claims():
            if self.catalog.relationship(c.vm_id) is not None:
                await self.catalog.remove_claim(c.vm_id)
            elif not VMDir.of(c.storage, c.vm_id).progress.exists():
                await self.catalog.remove_claim(c.vm_id)
                dropped.append(c)
        return dropped

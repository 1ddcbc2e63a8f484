"""Who may send what to this replica server, decided before anything is spent on it.

A change log's request is judged from the request alone — the authenticated principal,
the listener's auth type, the VM id in the URL — before any VM lock is taken and before
any byte of the log is read (docs/security.md, "Authorization"): a peer that will be
refused never holds a lock, a thread or a file. The same checks run again under the VM's
lock against the log's header (replica/service.py), since the catalog may change between."""

from __future__ import annotations

from pathlib import Path

from .. import log as logmod
from ..auth.authorize import Grant, authorize, best_entry
from ..catalog import Catalog
from ..errors import Busy, Conflict, Refused
from ..transport.client import LOGS_PER_REPLICA
from .settings import ServerSettings

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


class Admission:
    def __init__(self, catalog: Catalog, state_dir: Path, logs_per_peer: int = LOGS_PER_REPLICA):
        self.catalog = catalog
        self.state_dir = state_dir
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
        """What ``principal`` may do here over ``auth``: storage and trust group (raises Refused)."""
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
        """May ``principal`` send a log for ``vm_id`` at all? Raises Refused (not authorized;
        the VM was created under another trust group) or Conflict (the id is one of this
        host's own VMs)."""
        grant = self.grant(principal, auth)
        rel = self.catalog.relationship(vm_id)
        if rel is not None and rel.role == "replica" and rel.trust_group != grant.trust_group:
            log.warning("replica.refused", vm_id=vm_id, peer=principal, reason="trust group mismatch",
                        vm_group=rel.trust_group, peer_group=grant.trust_group)
            raise Refused(f"{principal} (trust group {grant.trust_group}) may not write to VM {vm_id}, "
                          "created under another trust group")
        if (rel is None or rel.role != "replica") and self.catalog.vm_by_id(vm_id) is not None:
            raise Conflict(f"VM {vm_id} exists on this host and is not a replica")
        return grant

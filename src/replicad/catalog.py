"""The state store: one SQLite database (WAL, synchronous=FULL) in state_dir.

Single source of truth for server settings, authorization entries, VMs, relationships
(with their statistics) and the audit log. Every write is one transaction: a crash leaves
either the old or the new row. Calls are short and thread-safe (one lock); callers on the
event loop use them directly for small writes, the apply path calls them from its worker
thread.

A write that SQLite cannot make (the state dir's disk is full, an I/O error) rolls back
and raises StateWriteFailed, one line naming the database. A relationship that could not
be written is kept in memory (``relationship()`` returns it) until a later write of it
succeeds: status stays honest about the failure that filled the disk, and the durable row
is still the last one written whole."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from pathlib import Path

from .errors import NotFound, ReplicadError
from .model import VM, AuthorizationEntry, Relationship, VMClaim, printable
from .times import utcnow

SCHEMA = """
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS auth_entries (primary_pattern TEXT PRIMARY KEY, storage TEXT NOT NULL,
                                         trust_group TEXT NOT NULL, max_disk_size INTEGER,
                                         max_storage INTEGER);
CREATE TABLE IF NOT EXISTS vms (id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS relationships (vm_id TEXT PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS replay (nonce TEXT PRIMARY KEY, expires REAL NOT NULL, boot TEXT NOT NULL DEFAULT '',
                                   expires_mono REAL NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS claims (vm_id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, principal TEXT NOT NULL,
                                   trust_group TEXT NOT NULL, storage TEXT NOT NULL, since TEXT NOT NULL,
                                   bytes INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS audit (id INTEGER PRIMARY KEY AUTOINCREMENT, time TEXT NOT NULL,
                                  actor TEXT NOT NULL, action TEXT NOT NULL, detail TEXT NOT NULL);
"""

MIGRATIONS = (("auth_entries", "max_disk_size", "INTEGER"), ("auth_entries", "max_storage", "INTEGER"),
              ("replay", "boot", "TEXT NOT NULL DEFAULT ''"), ("replay", "expires_mono", "REAL NOT NULL DEFAULT 0"))


def _boot_id() -> str:
    """This boot's id: monotonic times compare only within one boot."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


class StateWriteFailed(ReplicadError):
    """The state database could not be written; nothing of that write was kept."""

    transient = True
    http_status = 503


class Catalog:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._unsaved: dict[str, Relationship] = {}
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
            # columns added since a table was first created (a catalog from an older release)
            for table, column, decl in MIGRATIONS:
                have = {r[1] for r in self._db.execute(f"PRAGMA table_info({table})")}
                if column not in have:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def _tx(self):
        """One transaction under the lock; an SQLite failure rolls back and becomes
        StateWriteFailed (an IntegrityError is the caller's to handle)."""
        with self._lock:
            try:
                self._db.execute("BEGIN")
                yield self._db
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                if self._db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                if isinstance(e, sqlite3.IntegrityError):
                    raise
                raise StateWriteFailed(f"cannot write the state database {self.path}: {e}") from None

    def _write(self, sql: str, args: tuple = ()) -> int:
        with self._tx() as db:
            return db.execute(sql, args).rowcount

    def _read(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # settings ---------------------------------------------------------------------------
    def get_setting(self, key: str, default=None):
        rows = self._read("SELECT value FROM settings WHERE key=?", (key,))
        return json.loads(rows[0][0]) if rows else default

    def set_setting(self, key: str, value) -> None:
        self._write("INSERT INTO settings(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                    (key, json.dumps(value)))

    # authorization entries --------------------------------------------------------------
    def entries(self) -> list[AuthorizationEntry]:
        return [AuthorizationEntry(*r) for r in
                self._read("SELECT primary_pattern, storage, trust_group, max_disk_size, max_storage "
                           "FROM auth_entries ORDER BY primary_pattern")]

    def put_entry(self, e: AuthorizationEntry) -> None:
        self._write("INSERT INTO auth_entries(primary_pattern, storage, trust_group, max_disk_size, max_storage) "
                    "VALUES(?, ?, ?, ?, ?) ON CONFLICT(primary_pattern) DO UPDATE SET storage=excluded.storage, "
                    "trust_group=excluded.trust_group, max_disk_size=excluded.max_disk_size, "
                    "max_storage=excluded.max_storage",
                    (e.primary, e.storage, e.trust_group, e.max_disk_size, e.max_storage))

    def remove_entry(self, pattern: str) -> bool:
        return self._write("DELETE FROM auth_entries WHERE primary_pattern=?", (pattern,)) > 0

    # VMs --------------------------------------------------------------------------------
    def vms(self) -> list[VM]:
        return [VM.from_json(json.loads(r[0])) for r in self._read("SELECT doc FROM vms ORDER BY name")]

    def vm_by_name(self, name: str) -> VM | None:
        rows = self._read("SELECT doc FROM vms WHERE name=?", (name,))
        return VM.from_json(json.loads(rows[0][0])) if rows else None

    def vm_by_id(self, vm_id: str) -> VM | None:
        rows = self._read("SELECT doc FROM vms WHERE id=?", (vm_id,))
        return VM.from_json(json.loads(rows[0][0])) if rows else None

    def require_vm(self, vm_id: str) -> VM:
        """The VM, or NotFound: for callers that hold an id whose VM may have been removed
        meanwhile (`vm remove`, `replication remove`, a completed failover)."""
        vm = self.vm_by_id(vm_id)
        if vm is None:
            raise NotFound(f"VM {vm_id} is not on this host (removed meanwhile)")
        return vm

    def put_vm(self, vm: VM) -> None:
        self._write("INSERT INTO vms VALUES(?, ?, ?) "
                    "ON CONFLICT(id) DO UPDATE SET name=excluded.name, doc=excluded.doc",
                    (vm.id, vm.name, json.dumps(vm.to_json())))

    def remove_vm(self, vm_id: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM relationships WHERE vm_id=?", (vm_id,))
            db.execute("DELETE FROM vms WHERE id=?", (vm_id,))
        self._unsaved.pop(vm_id, None)

    # relationships ----------------------------------------------------------------------
    def relationships(self) -> list[Relationship]:
        out = [Relationship.from_json(json.loads(r[0])) for r in self._read("SELECT doc FROM relationships")]
        return [self._latest(r) for r in out]

    def relationship(self, vm_id: str) -> Relationship | None:
        rows = self._read("SELECT doc FROM relationships WHERE vm_id=?", (vm_id,))
        return self._latest(Relationship.from_json(json.loads(rows[0][0]))) if rows else None

    def require_relationship(self, vm_id: str) -> Relationship:
        """The VM's relationship, or NotFound: for callers that hold the id of a replication
        that may have been removed meanwhile (`replication remove`, a completed failover)."""
        rel = self.relationship(vm_id)
        if rel is None:
            raise NotFound(f"VM {vm_id} has no replication on this host (removed meanwhile)")
        return rel

    def _latest(self, rel: Relationship) -> Relationship:
        unsaved = self._unsaved.get(rel.vm_id)
        return Relationship.from_json(unsaved.to_json()) if unsaved is not None else rel

    def put_relationship(self, rel: Relationship) -> None:
        try:
            self._write("INSERT INTO relationships VALUES(?, ?) ON CONFLICT(vm_id) DO UPDATE SET doc=excluded.doc",
                        (rel.vm_id, json.dumps(rel.to_json())))
        except StateWriteFailed:
            self._unsaved[rel.vm_id] = Relationship.from_json(rel.to_json())
            raise
        self._unsaved.pop(rel.vm_id, None)

    def put_vm_and_relationship(self, vm: VM, rel: Relationship) -> None:
        """Both rows in one transaction (a replica VM is created with its relationship)."""
        with self._tx() as db:
            db.execute("INSERT INTO vms VALUES(?, ?, ?) ON CONFLICT(id) DO UPDATE SET name=excluded.name, "
                       "doc=excluded.doc", (vm.id, vm.name, json.dumps(vm.to_json())))
            db.execute("INSERT INTO relationships VALUES(?, ?) ON CONFLICT(vm_id) DO UPDATE SET doc=excluded.doc",
                       (rel.vm_id, json.dumps(rel.to_json())))
        self._unsaved.pop(rel.vm_id, None)

    def remove_relationship(self, vm_id: str) -> None:
        self._write("DELETE FROM relationships WHERE vm_id=?", (vm_id,))
        self._unsaved.pop(vm_id, None)

    # claims: VMs whose first copy is pending (replica/admission.py) --------------------
    def claims(self) -> list[VMClaim]:
        return [VMClaim(*r) for r in self._read("SELECT vm_id, name, principal, trust_group, storage, since, bytes "
                                                "FROM claims ORDER BY vm_id")]

    def claim_by_id(self, vm_id: str) -> VMClaim | None:
        rows = self._read("SELECT vm_id, name, principal, trust_group, storage, since, bytes FROM claims WHERE vm_id=?",
                          (vm_id,))
        return VMClaim(*rows[0]) if rows else None

    def claim_by_name(self, name: str) -> VMClaim | None:
        rows = self._read("SELECT vm_id, name, principal, trust_group, storage, since, bytes FROM claims WHERE name=?",
                          (name,))
        return VMClaim(*rows[0]) if rows else None

    def add_claim(self, c: VMClaim) -> bool:
        """Record a claim; False when its id or name is claimed already (nothing written)."""
        try:
            self._write("INSERT INTO claims VALUES(?, ?, ?, ?, ?, ?, ?)",
                        (c.vm_id, c.name, c.principal, c.trust_group, c.storage, c.since, c.bytes))
        except sqlite3.IntegrityError:
            return False
        return True

    def remove_claim(self, vm_id: str) -> bool:
        return self._write("DELETE FROM claims WHERE vm_id=?", (vm_id,)) > 0

    # replay cache -----------------------------------------------------------------------
    def remember_nonce(self, nonce: str, expires: float) -> bool:
        """Record a ticket nonce until ``expires`` (wall clock); False if it was already seen
        (a replay). Durable, so a ticket replayed after a restart is refused as well.

        A nonce is forgotten only once *both* clocks say it expired: the wall clock, and
        the monotonic clock of the boot it was recorded in (the validity left at the time,
        counted from then). A wall clock stepped forward (a bad NTP source, an operator)
        would otherwise purge the cache, and once stepped back every ticket seen in the
        last minutes could be replayed; a step backwards only keeps nonces longer."""
        now, mono, boot = time.time(), time.monotonic(), _boot_id()
        try:
            with self._tx() as db:
                db.execute("DELETE FROM replay WHERE expires < ? AND (boot != ? OR expires_mono < ?)",
                           (now, boot, mono))
                db.execute("INSERT INTO replay(nonce, expires, boot, expires_mono) VALUES(?, ?, ?, ?)",
                           (nonce, expires, boot, mono + max(0.0, expires - now)))
        except sqlite3.IntegrityError:
            return False
        return True

    # audit ------------------------------------------------------------------------------
    def audit(self, actor: str, action: str, detail: str) -> None:
        """One audit row; control and non-ASCII characters are stored escaped (an actor or
        a detail may carry a peer's words: `replicad audit` prints them as they are)."""
        self._write("INSERT INTO audit(time, actor, action, detail) VALUES(?, ?, ?, ?)",
                    (utcnow(), printable(actor), action, printable(detail)))

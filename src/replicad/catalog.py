"""The state store: one SQLite database (WAL, synchronous=FULL) in state_dir.

Single source of truth for server settings, authorization entries, VMs, relationships
(with their statistics) and the audit log. Every write is one transaction: a crash leaves
either the old or the new row. Calls are short and thread-safe (one lock); callers on the
event loop use them directly for small writes, the apply path calls them from its worker
thread."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

from .auth.authorize import AuthorizationEntry
from .model import VM, Relationship
from .times import utcnow

SCHEMA = """
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS auth_entries (primary_pattern TEXT PRIMARY KEY, storage TEXT NOT NULL,
                                         trust_group TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS vms (id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS relationships (vm_id TEXT PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS replay (nonce TEXT PRIMARY KEY, expires REAL NOT NULL);
CREATE TABLE IF NOT EXISTS audit (id INTEGER PRIMARY KEY AUTOINCREMENT, time TEXT NOT NULL,
                                  actor TEXT NOT NULL, action TEXT NOT NULL, detail TEXT NOT NULL);
"""


class Catalog:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _write(self, sql: str, args: tuple = ()) -> int:
        with self._lock:
            cur = self._db.execute(sql, args)
            return cur.rowcount

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
                self._read("SELECT primary_pattern, storage, trust_group FROM auth_entries ORDER BY primary_pattern")]

    def put_entry(self, e: AuthorizationEntry) -> None:
        self._write("INSERT INTO auth_entries VALUES(?, ?, ?) ON CONFLICT(primary_pattern) DO UPDATE SET "
                    "storage=excluded.storage, trust_group=excluded.trust_group", (e.primary, e.storage, e.trust_group))

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

    def put_vm(self, vm: VM) -> None:
        self._write("INSERT INTO vms VALUES(?, ?, ?) ON CONFLICT(id) DO UPDATE SET name=excluded.name, doc=excluded.doc",
                    (vm.id, vm.name, json.dumps(vm.to_json())))

    def remove_vm(self, vm_id: str) -> None:
        with self._lock:
            self._db.execute("BEGIN")
            self._db.execute("DELETE FROM relationships WHERE vm_id=?", (vm_id,))
            self._db.execute("DELETE FROM vms WHERE id=?", (vm_id,))
            self._db.execute("COMMIT")

    # relationships ----------------------------------------------------------------------
    def relationships(self) -> list[Relationship]:
        return [Relationship.from_json(json.loads(r[0])) for r in self._read("SELECT doc FROM relationships")]

    def relationship(self, vm_id: str) -> Relationship | None:
        rows = self._read("SELECT doc FROM relationships WHERE vm_id=?", (vm_id,))
        return Relationship.from_json(json.loads(rows[0][0])) if rows else None

    def put_relationship(self, rel: Relationship) -> None:
        self._write("INSERT INTO relationships VALUES(?, ?) ON CONFLICT(vm_id) DO UPDATE SET doc=excluded.doc",
                    (rel.vm_id, json.dumps(rel.to_json())))

    def put_vm_and_relationship(self, vm: VM, rel: Relationship) -> None:
        """Both rows in one transaction (a replica VM is created with its relationship)."""
        with self._lock:
            self._db.execute("BEGIN")
            self._db.execute("INSERT INTO vms VALUES(?, ?, ?) ON CONFLICT(id) DO UPDATE SET name=excluded.name, "
                             "doc=excluded.doc", (vm.id, vm.name, json.dumps(vm.to_json())))
            self._db.execute("INSERT INTO relationships VALUES(?, ?) ON CONFLICT(vm_id) DO UPDATE SET doc=excluded.doc",
                             (rel.vm_id, json.dumps(rel.to_json())))
            self._db.execute("COMMIT")

    def remove_relationship(self, vm_id: str) -> None:
        self._write("DELETE FROM relationships WHERE vm_id=?", (vm_id,))

    # replay cache -----------------------------------------------------------------------
    def remember_nonce(self, nonce: str, expires: float) -> bool:
        """Record a ticket nonce until ``expires``; False if it was already seen (a replay).
        Durable, so a ticket replayed after a restart is refused as well."""
        with self._lock:
            self._db.execute("BEGIN")
            self._db.execute("DELETE FROM replay WHERE expires < ?", (time.time(),))
            try:
                self._db.execute("INSERT INTO replay(nonce, expires) VALUES(?, ?)", (nonce, expires))
            except sqlite3.IntegrityError:
                self._db.execute("ROLLBACK")
                return False
            self._db.execute("COMMIT")
            return True

    # audit ------------------------------------------------------------------------------
    def audit(self, actor: str, action: str, detail: str) -> None:
        self._write("INSERT INTO audit(time, actor, action, detail) VALUES(?, ?, ?, ?)",
                    (utcnow(), actor, action, detail))

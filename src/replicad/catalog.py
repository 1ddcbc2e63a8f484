"""The state store: one SQLite database (WAL, synchronous=FULL) in state_dir.

Single source of truth for server settings, authorization entries, VMs, relationships
(with their statistics) and the audit log. Every write is one transaction: a crash leaves
either the old or the new row.

No commit runs on the event loop: a commit's fsync (synchronous=FULL) can take as long as
the disk wants. Writes are coroutines; each is one transaction on the catalog's one writer
thread, in the order they were made, so commits stay serialized, and the write returns once
its transaction is durable: what must be durable before an answer (an acknowledgement, a
verb's result) is awaited before it. Reads are plain calls, on a second connection (WAL:
a reader never waits for the writer's fsync) under a short lock, from the loop or a worker.

A write is *staged* when it is made, before its coroutine first waits: from then on every
read sees it, as if it were committed. So a read-modify-write on the loop stays what it was
when commits ran there — no other task can read the row between the read and the write —
and a later write of the same row builds on it; the row leaves the staging once its
transaction ends. Only the durability is later: another task may see a row its writer is
still waiting for.

A write that SQLite cannot make (the state dir's disk is full, an I/O error) rolls back
and raises StateWriteFailed, one line naming the database. A relationship that could not
be written is kept in memory (``relationship()`` returns it) until a later write of it
succeeds: status stays honest about the failure that filled the disk, and the durable row
is still the last one written whole. Any other staged row that could not be written is
dropped: reads see the durable row again.

A read by primary key (a VM, a relationship, a claim, a setting) is served from memory
(issue 18: a small cycle read its relationship ~9 times on each side, ~50 us each to parse):
the daemon is the catalog's only writer, so a committed row is kept once read or written and
replaced when a transaction of it commits (a failed one leaves it); a row that does not
exist is never kept (a peer's unknown id costs no memory). The record parsed from a row is
kept beside it, and each read gets a copy that shares nothing mutable with it (``_fresh``):
a caller changes its copy, never the catalog's."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import functools
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from .errors import NotFound, StateWriteFailed
from .model import VM, AuthorizationEntry, Relationship, VMClaim, printable
from .times import utcnow

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS auth_entries (primary_pattern TEXT PRIMARY KEY, storage TEXT NOT NULL,
                                         trust_group TEXT NOT NULL, max_disk_size INTEGER,
                                         max_storage INTEGER);
CREATE TABLE IF NOT EXISTS vms (id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS relationships (vm_id TEXT PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS replay (nonce TEXT PRIMARY KEY, expires REAL NOT NULL, boot TEXT NOT NULL DEFAULT '',
                                   expires_mono REAL NOT NULL DEFAULT 0);
-- each session's purge of expired nonces visits the expired rows only, not the whole cache
-- (a replica server of 200 VMs every 5 s holds ~24,000 nonces: 2.3 -> 0.45 ms a session)
CREATE INDEX IF NOT EXISTS replay_expires ON replay(expires);
CREATE TABLE IF NOT EXISTS claims (vm_id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, principal TEXT NOT NULL,
                                   trust_group TEXT NOT NULL, storage TEXT NOT NULL, since TEXT NOT NULL,
                                   bytes INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS audit (id INTEGER PRIMARY KEY AUTOINCREMENT, time TEXT NOT NULL,
                                  actor TEXT NOT NULL, action TEXT NOT NULL, detail TEXT NOT NULL);
"""

# expired nonces, at every session (remember_nonce); the index on `expires` keeps it to them
PURGE_NONCES = "DELETE FROM replay WHERE expires < ? AND (boot != ? OR expires_mono < ?)"

MIGRATIONS = (("auth_entries", "max_disk_size", "INTEGER"), ("auth_entries", "max_storage", "INTEGER"),
              ("replay", "boot", "TEXT NOT NULL DEFAULT ''"), ("replay", "expires_mono", "REAL NOT NULL DEFAULT 0"))


def _boot_id() -> str:
    """This boot's id: monotonic times compare only within one boot."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


Key = tuple[str, str]  # a row: (table, primary key)
Statement = tuple[str, tuple]


def _retrieved(f: asyncio.Future) -> None:
    """A write whose caller was cancelled while it waited still ends (its rows are staged):
    its failure, if any, is not a "never retrieved" one."""
    if not f.cancelled():
        f.exception()


def _vm(row: tuple) -> VM:
    return VM.from_json(json.loads(row[2]))


def _rel(row: tuple) -> Relationship:
    return Relationship.from_json(json.loads(row[1]))


_SHARED = frozenset((str, int, float, bool, type(None)))  # immutable: a copy may share them


@functools.cache
def _containers(cls: type) -> tuple[str, ...]:
    """The fields of a record class that hold a list, a dict or a record (those made by a
    ``default_factory``); the others hold a string, a number, None or an enum."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.default_factory is not dataclasses.MISSING)


def _is_record(o) -> bool:
    return hasattr(o, "__dataclass_fields__") and not isinstance(o, type)


def _copyable(o) -> bool:
    """Whether ``_fresh(o)`` shares nothing mutable with ``o``: every field of a record
    outside its ``_containers`` is immutable — true of every row the daemon writes; checked
    once a row (one that is not is parsed at each read instead)."""
    if isinstance(o, list):
        return all(_copyable(x) for x in o)
    if isinstance(o, dict):
        return all(_copyable(v) for v in o.values())
    if _is_record(o):
        inside = _containers(o.__class__)
        return all(_copyable(v) if k in inside else type(v) in _SHARED or isinstance(v, enum.Enum)
                   for k, v in vars(o).items())
    return type(o) in _SHARED or isinstance(o, enum.Enum)


def _fresh(o):
    """A copy of a parsed record (or value) that shares nothing mutable with ``o`` when
    ``_copyable(o)``: lists, dicts and a record's container fields copied, the rest shared."""
    if isinstance(o, list):
        return [x if type(x) in _SHARED else _fresh(x) for x in o]
    if isinstance(o, dict):
        return {k: v if type(v) in _SHARED else _fresh(v) for k, v in o.items()}
    if _is_record(o):
        new = object.__new__(type(o))
        fields = new.__dict__
        fields.update(vars(o))
        for k in _containers(o.__class__):
            if k in fields:
                fields[k] = _fresh(fields[k])
        return new
    return o


_VM_SQL = "INSERT INTO vms VALUES(?, ?, ?) ON CONFLICT(id) DO UPDATE SET name=excluded.name, doc=excluded.doc"
_REL_SQL = "INSERT INTO relationships VALUES(?, ?) ON CONFLICT(vm_id) DO UPDATE SET doc=excluded.doc"
_CLAIM_COLUMNS = "vm_id, name, principal, trust_group, storage, since, bytes"
_ENTRY_COLUMNS = "primary_pattern, storage, trust_group, max_disk_size, max_storage"


class Catalog:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()  # the staging, the unsaved rows, the reader connection
        self._staged: dict[Key, tuple[int, tuple | None]] = {}  # row (as selected) or None (removed)
        self._tickets = 0
        self._unsaved: dict[str, str] = {}  # vm_id -> a relationship's doc that could not be written
        self._rows: dict[Key, tuple] = {}  # committed rows by primary key, as read or written (never a missing one)
        self._records: dict[Key, tuple[tuple, object]] = {}  # (row, the record parsed from it) by primary key
        # the writer thread's connection (and, here, the schema's: before anything is served)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        # columns added since a table was first created (a catalog from an older release)
        for table, column, decl in MIGRATIONS:
            have = {r[1] for r in self._db.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
        self._reader = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._reader.execute("PRAGMA query_only=ON")
        # one thread: the transactions commit one at a time, in the order the writes were made
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="replicad-catalog")

    def close(self) -> None:
        """Wait for the writes made so far to end, then close. Blocks: call it off the loop."""
        self._writer.shutdown(wait=True)
        with self._lock:
            self._reader.close()
            self._db.close()

    # writing: one transaction at a time, on the writer thread -------------------------------
    def _submit(self, statements: list[Statement], rows: Iterable[tuple[Key, tuple | None]] = (),
                ended: Callable[[bool], None] | None = None) -> Future:
        """Stage ``rows`` (reads see them from now on) and queue their transaction (the
        ``statements``, one after the other) behind every write made before."""
        with self._lock:
            staged = []
            for key, row in rows:
                self._tickets += 1
                self._staged[key] = (self._tickets, row)
                staged.append((key, self._tickets, row))
        return self._writer.submit(self._transaction, lambda db: [db.execute(*s) for s in statements], staged, ended)

    async def _commit(self, statements: list[Statement], rows: Iterable[tuple[Key, tuple | None]] = (),
                      ended: Callable[[bool], None] | None = None) -> None:
        """``_submit``, then wait until the transaction is durable (or raise why it failed)."""
        done = asyncio.wrap_future(self._submit(statements, rows, ended))
        done.add_done_callback(_retrieved)
        return await asyncio.shield(done)  # a cancelled caller's write still ends, as staged

    def _transaction(self, work: Callable[[sqlite3.Connection], T], staged: list[tuple[Key, int, tuple | None]],
                     ended: Callable[[bool], None] | None) -> T:
        """On the writer thread: ``work`` in one transaction; then its rows leave the staging
        (unless written again meanwhile), become the committed rows reads keep (if it
        committed), and ``ended`` says how it went, under the lock."""
        ok = False
        try:
            with self._tx() as db:
                result = work(db)
            ok = True
            return result
        finally:
            with self._lock:
                for key, ticket, row in staged:
                    if self._staged.get(key, (0, None))[0] == ticket:
                        del self._staged[key]
                    if not ok:  # a record parsed from the row that could not be written goes
                        if key not in self._rows and key not in self._staged:
                            self._records.pop(key, None)
                        continue
                    if row is None:  # removed
                        self._rows.pop(key, None)
                        self._records.pop(key, None)
                    else:  # after the COMMIT: no read can have kept an older row since
                        self._rows[key] = row
                if ended is not None:
                    ended(ok)

    @contextlib.contextmanager
    def _tx(self):
        """One transaction on the writer's connection; an SQLite failure rolls back and
        becomes StateWriteFailed (an IntegrityError is the caller's to handle)."""
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

    async def settled(self) -> None:
        """Returns once every write made before the call is durable (or failed): what is read
        after it and told to a peer is never a state a crash can take back (reads see staged
        rows at once, which is right for this host's own decisions, not for a peer's)."""
        await asyncio.wrap_future(self._writer.submit(lambda: None))

    # reading: the committed rows with the staged ones over them ------------------------------
    def _view(self, table: str, sql: str, args: tuple = (), *, where: Callable[[tuple], bool] = lambda r: True,
              order: int | None = None) -> list[tuple]:
        """The rows of ``table`` that ``sql`` selects (its primary key first), as reads see
        them: a staged row replaces (or removes) the committed one; ``where`` is ``sql``'s
        condition, for the staged rows; sorted on column ``order``, like ``sql``."""
        with self._lock:
            rows = {r[0]: r for r in self._reader.execute(sql, args).fetchall()}
            if table == "relationships":
                for key in rows.keys() & self._unsaved.keys():
                    rows[key] = (key, self._unsaved[key])
            for (t, key), (_, row) in self._staged.items():
                if t != table:
                    continue
                if row is None or not where(row):
                    rows.pop(key, None)
                else:
                    rows[key] = row
        out = list(rows.values())
        return out if order is None else sorted(out, key=lambda r: r[order])

    def _one(self, table: str, sql: str, key: str) -> tuple | None:
        """The row of ``table`` whose primary key is ``key``, as reads see it (``_view``): the
        staged one, else the committed one — from memory once read or written (``sql``
        selects it by key otherwise) — or the relationship's doc that could not be written."""
        with self._lock:
            staged = self._staged.get((table, key))
            if staged is not None:
                return staged[1]
            row = self._rows.get((table, key))
            if row is None:
                found = self._reader.execute(sql, (key,)).fetchall()
                if not found:
                    return None
                row = self._rows[(table, key)] = found[0]
            if table == "relationships" and key in self._unsaved:
                return (key, self._unsaved[key])
            return row

    def _record(self, table: str, row: tuple, parse: Callable[[tuple], T]) -> T:
        """``parse(row)``, from the record kept for that row when it is the same row (a
        copy of it: the caller may change what it gets)."""
        key = (table, row[0])
        kept = self._records.get(key)
        if kept is None or kept[0] != row:
            record = parse(row)
            if not _copyable(record):
                return record
            kept = (row, record)
            with self._lock:  # not for a row removed meanwhile: nothing would ever drop it
                if key in self._rows or key in self._staged:
                    self._records[key] = kept
        return _fresh(kept[1])

    # settings ---------------------------------------------------------------------------
    def get_setting(self, key: str, default=None):
        row = self._one("settings", "SELECT key, value FROM settings WHERE key=?", key)
        return default if row is None else self._record("settings", row, lambda r: json.loads(r[1]))

    async def set_setting(self, key: str, value) -> None:
        text = json.dumps(value)
        await self._commit([("INSERT INTO settings(key, value) VALUES(?, ?) "
                             "ON CONFLICT(key) DO UPDATE SET value=excluded.value", (key, text))],
                           [(("settings", key), (key, text))])

    # authorization entries --------------------------------------------------------------
    def entries(self) -> list[AuthorizationEntry]:
        return [AuthorizationEntry(*r) for r in
                self._view("auth_entries", f"SELECT {_ENTRY_COLUMNS} FROM auth_entries", order=0)]

    async def put_entry(self, e: AuthorizationEntry) -> None:
        row = (e.primary, e.storage, e.trust_group, e.max_disk_size, e.max_storage)
        await self._commit([(f"INSERT INTO auth_entries({_ENTRY_COLUMNS}) VALUES(?, ?, ?, ?, ?) "
                             "ON CONFLICT(primary_pattern) DO UPDATE SET storage=excluded.storage, "
                             "trust_group=excluded.trust_group, max_disk_size=excluded.max_disk_size, "
                             "max_storage=excluded.max_storage", row)],
                           [(("auth_entries", e.primary), row)])

    async def remove_entry(self, pattern: str) -> bool:
        if not any(e.primary == pattern for e in self.entries()):
            return False
        await self._commit([("DELETE FROM auth_entries WHERE primary_pattern=?", (pattern,))],
                           [(("auth_entries", pattern), None)])
        return True

    # VMs --------------------------------------------------------------------------------
    def vms(self) -> list[VM]:
        return [self._record("vms", r, _vm) for r in self._view("vms", "SELECT id, name, doc FROM vms", order=1)]

    def vm_by_name(self, name: str) -> VM | None:
        rows = self._view("vms", "SELECT id, name, doc FROM vms WHERE name=?", (name,), where=lambda r: r[1] == name)
        return self._record("vms", rows[0], _vm) if rows else None

    def vm_by_id(self, vm_id: str) -> VM | None:
        row = self._one("vms", "SELECT id, name, doc FROM vms WHERE id=?", vm_id)
        return None if row is None else self._record("vms", row, _vm)

    def require_vm(self, vm_id: str) -> VM:
        """The VM, or NotFound: for callers that hold an id whose VM may have been removed
        meanwhile (`vm remove`, `replication remove`, a completed failover)."""
        vm = self.vm_by_id(vm_id)
        if vm is None:
            raise NotFound(f"VM {vm_id} is not on this host (removed meanwhile)")
        return vm

    async def put_vm(self, vm: VM) -> None:
        row = (vm.id, vm.name, vm.doc())
        await self._commit([(_VM_SQL, row)], [(("vms", vm.id), row)])

    async def remove_vm(self, vm_id: str) -> None:
        await self._commit([("DELETE FROM relationships WHERE vm_id=?", (vm_id,)),
                            ("DELETE FROM vms WHERE id=?", (vm_id,))],
                           [(("relationships", vm_id), None), (("vms", vm_id), None)], self._saved(vm_id))

    # relationships ----------------------------------------------------------------------
    def relationships(self) -> list[Relationship]:
        return [self._record("relationships", r, _rel)
                for r in self._view("relationships", "SELECT vm_id, doc FROM relationships")]

    def relationship(self, vm_id: str) -> Relationship | None:
        row = self._one("relationships", "SELECT vm_id, doc FROM relationships WHERE vm_id=?", vm_id)
        return None if row is None else self._record("relationships", row, _rel)

    def require_relationship(self, vm_id: str) -> Relationship:
        """The VM's relationship, or NotFound: for callers that hold the id of a replication
        that may have been removed meanwhile (`replication remove`, a completed failover)."""
        rel = self.relationship(vm_id)
        if rel is None:
            raise NotFound(f"VM {vm_id} has no replication on this host (removed meanwhile)")
        return rel

    def _saved(self, vm_id: str, doc: str | None = None) -> Callable[[bool], None]:
        """When a write of the VM's relationship ends: written, no unsaved doc is kept; with
        ``doc``, one that could not be written is kept in memory (reads return it)."""
        def ended(ok: bool) -> None:
            if ok:
                self._unsaved.pop(vm_id, None)
            elif doc is not None:
                self._unsaved[vm_id] = doc
        return ended

    async def put_relationship(self, rel: Relationship) -> None:
        row = (rel.vm_id, rel.doc())
        await self._commit([(_REL_SQL, row)], [(("relationships", rel.vm_id), row)], self._saved(rel.vm_id, row[1]))

    async def put_vm_and_relationship(self, vm: VM, rel: Relationship) -> None:
        """Both rows in one transaction (a replica VM is created with its relationship)."""
        vm_row, rel_row = (vm.id, vm.name, vm.doc()), (rel.vm_id, rel.doc())
        await self._commit([(_VM_SQL, vm_row), (_REL_SQL, rel_row)],
                           [(("vms", vm.id), vm_row), (("relationships", rel.vm_id), rel_row)], self._saved(rel.vm_id))

    async def remove_relationship(self, vm_id: str) -> None:
        await self._commit([("DELETE FROM relationships WHERE vm_id=?", (vm_id,))],
                           [(("relationships", vm_id), None)], self._saved(vm_id))

    # claims: VMs whose first copy is pending (replica/admission.py) --------------------
    def claims(self) -> list[VMClaim]:
        return [VMClaim(*r) for r in self._view("claims", f"SELECT {_CLAIM_COLUMNS} FROM claims", order=0)]

    def claim_by_id(self, vm_id: str) -> VMClaim | None:
        row = self._one("claims", f"SELECT {_CLAIM_COLUMNS} FROM claims WHERE vm_id=?", vm_id)
        return None if row is None else VMClaim(*row)

    def claim_by_name(self, name: str) -> VMClaim | None:
        rows = self._view("claims", f"SELECT {_CLAIM_COLUMNS} FROM claims WHERE name=?", (name,),
                          where=lambda r: r[1] == name)
        return VMClaim(*rows[0]) if rows else None

    async def add_claim(self, c: VMClaim) -> bool:
        """Record a claim; False when its id or name is claimed already (nothing written)."""
        if self.claim_by_id(c.vm_id) is not None or self.claim_by_name(c.name) is not None:
            return False
        row = dataclasses.astuple(c)
        try:
            await self._commit([(f"INSERT INTO claims({_CLAIM_COLUMNS}) VALUES(?, ?, ?, ?, ?, ?, ?)", row)],
                               [(("claims", c.vm_id), row)])
        except sqlite3.IntegrityError:
            return False
        return True

    async def replace_claim(self, c: VMClaim) -> None:
        """The claim of ``c.vm_id`` replaced by ``c`` (same name), in one transaction."""
        row = dataclasses.astuple(c)
        await self._commit([("DELETE FROM claims WHERE vm_id=?", (c.vm_id,)),
                            (f"INSERT INTO claims({_CLAIM_COLUMNS}) VALUES(?, ?, ?, ?, ?, ?, ?)", row)],
                           [(("claims", c.vm_id), row)])

    async def remove_claim(self, vm_id: str) -> bool:
        if self.claim_by_id(vm_id) is None:
            return False
        await self._commit([("DELETE FROM claims WHERE vm_id=?", (vm_id,))], [(("claims", vm_id), None)])
        return True

    def remove_claim_later(self, vm_id: str) -> None:
        """Remove a claim without waiting for the commit (reads no longer see it): for a
        stale claim found by a check, whose removal need not be durable before anything —
        if it is not, the claim is found stale and removed again."""
        self._submit([("DELETE FROM claims WHERE vm_id=?", (vm_id,))], [(("claims", vm_id), None)])

    # replay cache -----------------------------------------------------------------------
    async def remember_nonce(self, nonce: str, expires: float) -> bool:
        """Record a ticket nonce until ``expires`` (wall clock); False if it was already seen
        (a replay). Durable, so a ticket replayed after a restart is refused as well.

        A nonce is forgotten only once *both* clocks say it expired: the wall clock, and
        the monotonic clock of the boot it was recorded in (the validity left at the time,
        counted from then). A wall clock stepped forward (a bad NTP source, an operator)
        would otherwise purge the cache, and once stepped back every ticket seen in the
        last minutes could be replayed; a step backwards only keeps nonces longer."""
        now, mono, boot = time.time(), time.monotonic(), _boot_id()
        try:
            await self._commit([(PURGE_NONCES, (now, boot, mono)),
                                ("INSERT INTO replay(nonce, expires, boot, expires_mono) VALUES(?, ?, ?, ?)",
                                 (nonce, expires, boot, mono + max(0.0, expires - now)))])
        except sqlite3.IntegrityError:
            return False
        return True

    # audit ------------------------------------------------------------------------------
    async def audit(self, actor: str, action: str, detail: str) -> None:
        """One audit row; control and non-ASCII characters are stored escaped (an actor or
        a detail may carry a peer's words: `replicad audit` prints them as they are)."""
        await self._commit([("INSERT INTO audit(time, actor, action, detail) VALUES(?, ?, ?, ?)",
                             (utcnow(), printable(actor), action, printable(detail)))])

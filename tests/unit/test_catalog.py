"""The state database: writes committed off the event loop, in order, staged for every
read at once; and when it cannot be written (a full state dir): SQLite's own page limit
stands in for the full disk (SQLITE_FULL, "database or disk is full")."""

import asyncio

import pytest
from tests.inprocess.daemons import HeldCommits, until

from replicad.catalog import Catalog, StateWriteFailed
from replicad.model import VM, Relationship, VMClaim


def _full(cat: Catalog) -> None:
    pages = cat._db.execute("PRAGMA page_count").fetchone()[0]
    cat._db.execute(f"PRAGMA max_page_count={pages}")


async def test_a_write_that_does_not_fit_rolls_back_and_is_kept_in_memory(tmp_path):
    cat = Catalog(tmp_path / "catalog.sqlite")
    rel = Relationship("vm-1", "primary", replica_server="r.contoso.com")
    await cat.put_relationship(rel)
    _full(cat)
    rel.error = "local I/O error: No space left on device " + "x" * 20000  # needs new pages
    with pytest.raises(StateWriteFailed, match="database or disk is full") as e:
        await cat.put_relationship(rel)
    assert str(cat.path) in str(e.value) and e.value.transient
    assert not cat._db.in_transaction
    # status sees the failure; the durable row is the last one written whole
    assert cat.relationship("vm-1").error == rel.error
    assert [r.error for r in cat.relationships()] == [rel.error]
    durable = Catalog(tmp_path / "catalog.sqlite").relationship("vm-1")
    assert durable.error is None and durable.replica_server == "r.contoso.com"

    cat._db.execute("PRAGMA max_page_count=1073741823")  # space is back
    rel.error = None
    await cat.put_relationship(rel)
    assert Catalog(tmp_path / "catalog.sqlite").relationship("vm-1").error is None
    assert cat.relationship("vm-1").error is None


async def test_other_writes_fail_cleanly_and_the_replay_cache_still_refuses_replays(tmp_path):
    cat = Catalog(tmp_path / "catalog.sqlite")
    await cat.put_vm(VM("vm-1", "web"))
    assert await cat.remember_nonce("n1", 2e9)
    assert not await cat.remember_nonce("n1", 2e9)  # a replay, not an error
    _full(cat)
    with pytest.raises(StateWriteFailed):
        await cat.audit("admin", "test", "y" * 50000)
    with pytest.raises(StateWriteFailed):  # a staged row that could not be written is dropped
        await cat.put_vm(VM("vm-1", "web" + "y" * 50000))
    assert cat.vm_by_id("vm-1").name == "web" and cat.vm_by_name("web") is not None
    assert not cat._db.in_transaction
    assert not await cat.remember_nonce("n1", 2e9)


async def test_a_slow_commit_runs_off_the_loop_and_reads_see_the_write_at_once(tmp_path):
    """A commit's fsync does not hold the event loop: while it waits, the loop runs, and
    every read already sees the write (a read-modify-write on the loop builds on it); the
    writer's own ``await`` returns only once it is durable; later writes commit after it."""
    cat = Catalog(tmp_path / "catalog.sqlite")
    await cat.put_relationship(Relationship("vm-1", "primary", replica_server="r.contoso.com"))
    hold = HeldCommits(cat, lambda sql: any("relationships" in s for s in sql))
    rel = cat.require_relationship("vm-1")
    rel.seq = 7
    first = asyncio.create_task(cat.put_relationship(rel))
    await until(hold.held.is_set, what="the commit to be held in the writer thread")
    assert not first.done()  # not durable: its writer still waits...
    assert Catalog(tmp_path / "catalog.sqlite").relationship("vm-1").seq == 0
    assert cat.relationship("vm-1").seq == 7  # ...and every read sees it already
    again = cat.require_relationship("vm-1")  # a read-modify-write builds on it
    again.error = "later"
    second = asyncio.create_task(cat.put_relationship(again))
    claimed = asyncio.create_task(cat.add_claim(VMClaim("vm-2", "db", "p", "g", "/s", "now")))
    await until(lambda: cat.claim_by_name("db") is not None, what="the later writes to be staged")
    assert cat.relationship("vm-1").error == "later"
    assert not await cat.add_claim(VMClaim("vm-3", "db", "p", "g", "/s", ""))  # the name is taken
    hold.release.set()
    await asyncio.gather(first, second, claimed)
    durable = Catalog(tmp_path / "catalog.sqlite")
    assert (durable.relationship("vm-1").seq, durable.relationship("vm-1").error) == (7, "later")
    assert [c.vm_id for c in durable.claims()] == ["vm-2"]
    assert cat._staged == {}
    cat.close()


async def test_a_cancelled_writer_still_writes_what_it_staged(tmp_path):
    cat = Catalog(tmp_path / "catalog.sqlite")
    hold = HeldCommits(cat, lambda sql: True)
    task = asyncio.create_task(cat.put_vm(VM("vm-1", "web")))
    await until(hold.held.is_set, what="the commit to be held")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cat.vm_by_name("web") is not None  # staged: reads see it
    hold.release.set()
    await asyncio.to_thread(cat.close)  # waits for the writes made so far
    assert Catalog(tmp_path / "catalog.sqlite").vm_by_name("web") is not None


def test_a_stored_row_is_its_to_json_and_reads_back_equal():
    """The catalog stores ``doc()`` (no deep copy): the same JSON as ``to_json()``, nested
    stats and disks included, and a row read back is the object written."""
    import json

    from replicad.model import Disk, ReplicationMode, ReplicationState, Stats, VMState
    rel = Relationship(vm_id="v1", role="replica", state=ReplicationState.REPLICATING, seq=7,
                       stats=Stats(successful_count=3, latency_total=1.5),
                       failover={"point": 3, "disks": [[1, 2, 3]], "stats": Stats(errors=1)},
                       points=[{"seq": 5, "time": "t"}], pinned=[5], primary_ports=[1, 2])
    vm = VM(id="v1", name="web", mode=ReplicationMode.REPLICA, state=VMState.OFF,
            disks=[Disk("/a.img", 5), Disk("/b.qcow2", 9, "qcow2", "n1")], hooks={"pre": "/bin/true"})
    for obj in (rel, vm):
        assert json.loads(obj.doc()) == obj.to_json()
    assert Relationship.from_json(json.loads(rel.doc())).failover == {"point": 3, "disks": [[1, 2, 3]],
                                                                   "stats": vars(Stats(errors=1))}
    assert VM.from_json(json.loads(vm.doc())) == vm


async def test_reads_by_key_are_parsed_once_a_row_and_each_read_is_the_callers_own_copy(tmp_path, monkeypatch):
    """Issue 18: a relationship, a VM or a setting read by its key is parsed once per row
    written, not at every read (a small cycle read its relationship ~9 times on each side).
    Each read is the caller's own copy: changing it — nested statistics, lists and dicts
    included — changes nothing another read sees. A committed write replaces it, one that
    could not be written leaves the durable row, a removed row reads as gone, and an id
    that has no row keeps nothing in memory (a peer's made-up id)."""
    import replicad.catalog as catalog_mod

    parsed = []
    real_rel = catalog_mod._rel
    monkeypatch.setattr(catalog_mod, "_rel", lambda row: parsed.append(row[0]) or real_rel(row))
    cat = Catalog(tmp_path / "catalog.sqlite")
    rel = Relationship("vm-1", "replica", points=[{"seq": 1}], failover={"disks": [[1, 2]]}, primary_ports=[5, 6])
    await cat.put_vm_and_relationship(VM("vm-1", "web"), rel)
    await cat.set_setting("s", {"a": [1]})
    for _ in range(5):
        mine = cat.relationship("vm-1")
        assert mine == rel
        mine.seq, mine.stats.errors = 9, 5
        mine.points.append({"seq": 2})
        mine.points[0]["seq"] = 7
        mine.failover["disks"][0].append(3)
        mine.primary_ports[0] = 1
        cat.vm_by_id("vm-1").disks.append("x")
        cat.get_setting("s")["a"].append(2)
    assert parsed == ["vm-1"]  # once, for five reads
    assert cat.relationship("vm-1") == rel and cat.vm_by_id("vm-1").disks == []
    assert cat.get_setting("s") == {"a": [1]}

    rel.seq = 3
    await cat.put_relationship(rel)  # written: the next read is the new row, parsed once
    assert cat.relationship("vm-1").seq == 3 and cat.require_relationship("vm-1").seq == 3
    assert parsed == ["vm-1", "vm-1"]
    assert Catalog(tmp_path / "catalog.sqlite").relationship("vm-1").seq == 3

    _full(cat)  # a write that cannot be made: reads are the durable row again
    with pytest.raises(StateWriteFailed):
        await cat.put_vm(VM("vm-1", "web" + "y" * 50000))
    assert cat.vm_by_id("vm-1").name == "web"
    cat._db.execute("PRAGMA max_page_count=1073741823")

    await cat.remove_vm("vm-1")
    assert cat.vm_by_id("vm-1") is None and cat.relationship("vm-1") is None
    assert cat.relationship("made-up") is None and cat.vm_by_id("made-up") is None
    assert not [k for k in (*cat._rows, *cat._records) if k[1] in ("vm-1", "made-up")]
    assert Catalog(tmp_path / "catalog.sqlite").vm_by_id("vm-1") is None
    cat.close()


async def test_a_read_while_a_commit_waits_then_after_it_follows_the_row(tmp_path):
    """A row read (and kept) before a write, read while the write's commit waits, and after
    it: the old row, then the staged one, then the committed one — never the old one again."""
    cat = Catalog(tmp_path / "catalog.sqlite")
    await cat.put_relationship(Relationship("vm-1", "primary", seq=1))
    assert cat.relationship("vm-1").seq == 1  # kept
    hold = HeldCommits(cat, lambda sql: any("relationships" in s for s in sql))
    task = asyncio.create_task(cat.put_relationship(Relationship("vm-1", "primary", seq=2)))
    await until(hold.held.is_set, what="the commit to be held in the writer thread")
    assert cat.relationship("vm-1").seq == 2
    hold.release.set()
    await task
    assert cat.relationship("vm-1").seq == 2 and cat._rows[("relationships", "vm-1")][1] == \
        Relationship("vm-1", "primary", seq=2).doc()
    cat.close()


async def test_a_row_with_a_container_where_a_value_belongs_is_still_each_readers_own(tmp_path):
    """A copy shares a record's plain fields (strings, numbers, enums): a row holding a list
    in such a field (never written by the daemon, but a row is a row) is parsed at each read
    instead of kept, so no reader changes what another reads."""
    cat = Catalog(tmp_path / "catalog.sqlite")
    rel = Relationship("vm-1", "primary")
    rel.error = ["odd"]  # type: ignore[assignment]
    await cat.put_relationship(rel)
    cat.relationship("vm-1").error.append("changed")
    assert cat.relationship("vm-1").error == ["odd"]
    assert ("relationships", "vm-1") not in cat._records
    cat.close()


async def test_the_purge_of_expired_nonces_visits_those_only(tmp_path):
    """Each session purges expired nonces from the replay cache: through the index on their
    expiry, not a scan of every nonce (a replica server of 200 VMs every 5 s holds ~24,000:
    a scan made each session cost it 2.3 ms, bench/cycle_cost.py) — also in a catalog made
    before the index existed. A nonce not yet expired stays, an expired one goes."""
    import sqlite3

    from replicad.catalog import PURGE_NONCES
    old = sqlite3.connect(tmp_path / "catalog.sqlite")  # an older release's replay table
    old.execute("CREATE TABLE replay (nonce TEXT PRIMARY KEY, expires REAL NOT NULL)")
    old.close()
    cat = Catalog(tmp_path / "catalog.sqlite")
    plan = " ".join(str(r) for r in cat._db.execute(f"EXPLAIN QUERY PLAN {PURGE_NONCES}", (0.0, "", 0.0)))
    assert "USING INDEX replay_expires" in plan, plan
    assert await cat.remember_nonce("expired", 1.0) and await cat.remember_nonce("live", 4e9)
    assert await cat.remember_nonce("next", 4e9)  # its purge takes "expired"
    assert {r[0] for r in cat._db.execute("SELECT nonce FROM replay")} == {"live", "next"}
    assert not await cat.remember_nonce("live", 4e9)
    cat.close()

"""The state database when it cannot be written (a full state dir): SQLite's own page limit
stands in for the full disk (SQLITE_FULL, "database or disk is full")."""

import pytest

from replicad.catalog import Catalog, StateWriteFailed
from replicad.model import Relationship


def _full(cat: Catalog) -> None:
    pages = cat._db.execute("PRAGMA page_count").fetchone()[0]
    cat._db.execute(f"PRAGMA max_page_count={pages}")


def test_a_write_that_does_not_fit_rolls_back_and_is_kept_in_memory(tmp_path):
    cat = Catalog(tmp_path / "catalog.sqlite")
    rel = Relationship("vm-1", "primary", replica_server="r.contoso.com")
    cat.put_relationship(rel)
    _full(cat)
    rel.error = "local I/O error: No space left on device " + "x" * 20000  # needs new pages
    with pytest.raises(StateWriteFailed, match="database or disk is full") as e:
        cat.put_relationship(rel)
    assert str(cat.path) in str(e.value) and e.value.transient
    assert not cat._db.in_transaction
    # status sees the failure; the durable row is the last one written whole
    assert cat.relationship("vm-1").error == rel.error
    assert [r.error for r in cat.relationships()] == [rel.error]
    durable = Catalog(tmp_path / "catalog.sqlite").relationship("vm-1")
    assert durable.error is None and durable.replica_server == "r.contoso.com"

    cat._db.execute("PRAGMA max_page_count=1073741823")  # space is back
    rel.error = None
    cat.put_relationship(rel)
    assert Catalog(tmp_path / "catalog.sqlite").relationship("vm-1").error is None
    assert cat.relationship("vm-1").error is None


def test_other_writes_fail_cleanly_and_the_replay_cache_still_refuses_replays(tmp_path):
    cat = Catalog(tmp_path / "catalog.sqlite")
    assert cat.remember_nonce("n1", 2e9)
    assert not cat.remember_nonce("n1", 2e9)  # a replay, not an error
    _full(cat)
    with pytest.raises(StateWriteFailed):
        cat.audit("admin", "test", "y" * 50000)
    assert not cat._db.in_transaction
    assert not cat.remember_nonce("n1", 2e9)

"""A wall clock that jumps (a bad NTP source, an operator's `date -s`) neither reopens the
replay window of tickets already seen nor ends or extends token-mode sessions: both are
counted on clocks a step cannot move. The jump is a fake wall clock (``time.time``); the
monotonic clock runs on, as the kernel's does."""

import json
import time

import pytest

from replicad.auth.session import SessionStore
from replicad.auth.token import Credential, Ticket, realm_init, realm_issue
from replicad.catalog import Catalog
from replicad.errors import AuthenticationFailed

HOURS = 3600


@pytest.fixture
def wall(monkeypatch):
    """``wall.jump(seconds)`` steps this process's wall clock; ``wall.jump(0)`` puts it back."""
    real = time.time

    class Wall:
        def jump(self, seconds: float) -> None:
            monkeypatch.setattr(time, "time", lambda: real() + seconds)
    return Wall()


async def test_a_seen_ticket_stays_refused_across_a_wall_clock_jump(tmp_path, wall):
    catalog = Catalog(tmp_path / "catalog.sqlite")
    expires = time.time() + 600  # a ticket's validity plus the allowed skew
    assert await catalog.remember_nonce("seen-once", expires)
    wall.jump(2 * HOURS)  # stepped ahead: every nonce looks expired to the wall clock
    assert await catalog.remember_nonce("during-the-jump", time.time() + 600)  # a session then purges the cache
    wall.jump(0)  # and stepped back: the first ticket is inside its window again
    assert not await catalog.remember_nonce("seen-once", expires)
    catalog.close()


async def test_an_expired_nonce_is_forgotten_once_both_clocks_agree(tmp_path, wall):
    catalog = Catalog(tmp_path / "catalog.sqlite")
    assert await catalog.remember_nonce("old", time.time() - 1)  # no validity left on either clock
    assert await catalog.remember_nonce("next", time.time() + 600)
    rows = [n for (n,) in catalog._reader.execute("SELECT nonce FROM replay")]
    assert rows == ["next"]  # the cache does not grow for ever
    catalog.close()


def _store(tmp_path, timeout: float = 300.0) -> tuple[SessionStore, Ticket]:
    realm_init("contoso.com", tmp_path / "realm")
    realm_issue(tmp_path / "realm", "vmhost1.contoso.com", tmp_path / "v1.cred")
    store = SessionStore(Credential.load(tmp_path / "v1.cred"), timeout)
    now = int(time.time())
    return store, Ticket("vmhost2.contoso.com", "vmhost1.contoso.com", now, now + 300, "ab" * 16, b"\x09" * 32)


def _header(store: SessionStore, sid: str, counter: int) -> str:
    sess = store._sessions[sid]
    return f"ReplicadSession {sid} {counter} {sess.request_mac('GET', '/v1/hello', counter, '')}"


def test_a_session_neither_ends_nor_lasts_longer_when_the_wall_clock_jumps(tmp_path, wall):
    store, ticket = _store(tmp_path)
    sid = json.loads(store.accept(ticket, {})[0])["session"]
    wall.jump(2 * HOURS)  # ahead: the ticket has long expired on this clock; the session has not
    store.check(_header(store, sid, 1), "GET", "/v1/hello", "")
    wall.jump(-2 * HOURS)
    store.check(_header(store, sid, 2), "GET", "/v1/hello", "")


def test_a_session_ends_on_the_servers_monotonic_clock(tmp_path, wall):
    store, ticket = _store(tmp_path, timeout=0.2)
    sid = json.loads(store.accept(ticket, {})[0])["session"]
    wall.jump(-2 * HOURS)  # behind: the ticket looks young for hours more
    deadline, counter = time.monotonic() + 5, 0
    while time.monotonic() < deadline:  # the session's idle time runs out on the server's clock
        counter += 1
        try:
            store.check(_header(store, sid, counter), "GET", "/v1/hello", "")
        except AuthenticationFailed as e:
            assert "expired" in str(e)
            return
        time.sleep(0.05)
    raise AssertionError("the idle session did not end")

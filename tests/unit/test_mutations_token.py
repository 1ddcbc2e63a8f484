"""Ticket and session checks that single-line mutations of auth/ once slipped past
(issue 16, item 8; docs/design.md "Mutations the suite is known to catch"): a lifetime
over the maximum, a ticket that expires before it was issued, and every bound of a
ticket or a session header tried at exactly its limit (accepted) and one past it
(refused), the rest of the input well formed and correctly signed."""

import json
import secrets

import pytest

from replicad.auth import session as session_mod
from replicad.auth.session import SessionStore
from replicad.auth.token import (
    MAX_SKEW,
    MAX_TICKET_LEN,
    TICKET_LIFETIME,
    Credential,
    RealmPublic,
    Ticket,
    _b64,
    realm_init,
    realm_issue,
    verify_ticket,
)
from replicad.errors import AuthenticationFailed, Busy

NOW = 1_800_000_000
AUD = "vmhost2.contoso.com"


@pytest.fixture(scope="module")
def realm(tmp_path_factory):
    d = tmp_path_factory.mktemp("realm")
    realm_init("contoso.com", d / "realm")
    realm_issue(d / "realm", "vmhost1.contoso.com", d / "h1.cred")
    realm_issue(d / "realm", AUD, d / "h2.cred")
    return RealmPublic.load(d / "realm" / "realm.pub"), Credential.load(d / "h1.cred"), Credential.load(d / "h2.cred")


def signed(cred: Credential, **change) -> str:
    """A ticket as ``Credential.ticket`` makes it, with fields changed and signed again."""
    doc = {"v": 1, "realm": cred.realm, "client": cred.host, "pub": _b64(cred.public_bytes),
           "assertion": _b64(cred.assertion), "aud": AUD, "iat": NOW, "exp": NOW + TICKET_LIFETIME,
           "nonce": secrets.token_hex(16), **change}
    body = json.dumps(doc, separators=(",", ":")).encode()
    return _b64(body) + "." + _b64(cred.key.sign(body))


def test_the_longest_lifetime_is_accepted_and_one_second_more_refused(realm):
    pub, cred, _ = realm
    assert verify_ticket(cred.ticket(AUD, now=NOW, lifetime=TICKET_LIFETIME), pub, AUD, now=NOW).expires \
        == NOW + TICKET_LIFETIME
    with pytest.raises(AuthenticationFailed, match="lifetime over"):
        verify_ticket(cred.ticket(AUD, now=NOW, lifetime=TICKET_LIFETIME + 1), pub, AUD, now=NOW)


def test_a_ticket_that_expires_before_it_was_issued_is_refused(realm):
    pub, cred, _ = realm
    assert verify_ticket(signed(cred, exp=NOW), pub, AUD, now=NOW).expires == NOW  # zero lifetime: still sane
    with pytest.raises(AuthenticationFailed, match="lifetime"):
        verify_ticket(signed(cred, exp=NOW - 1), pub, AUD, now=NOW)
    with pytest.raises(AuthenticationFailed, match="lifetime"):  # far in the past: not "expired", but never valid
        verify_ticket(signed(cred, iat=NOW + 200, exp=NOW + 100), pub, AUD, now=NOW)


def test_clock_skew_bounds_are_exact(realm):
    pub, cred, _ = realm
    verify_ticket(cred.ticket(AUD, now=NOW + MAX_SKEW), pub, AUD, now=NOW)
    with pytest.raises(AuthenticationFailed, match="not yet valid"):
        verify_ticket(cred.ticket(AUD, now=NOW + MAX_SKEW + 1), pub, AUD, now=NOW)
    # expired exactly MAX_SKEW ago: still taken; a second more: refused
    verify_ticket(cred.ticket(AUD, now=NOW - MAX_SKEW - TICKET_LIFETIME), pub, AUD, now=NOW)
    with pytest.raises(AuthenticationFailed, match="expired"):
        verify_ticket(cred.ticket(AUD, now=NOW - MAX_SKEW - TICKET_LIFETIME - 1), pub, AUD, now=NOW)


def padded(cred: Credential, length: int) -> str:
    """A correctly signed ticket of exactly ``length`` characters: an unknown field pads it,
    and the signature keeps its standard base64 padding ("==") where unpadded base64 cannot
    reach the length (no base64 text is 1 modulo 4 characters long)."""
    start = max(0, (length - len(signed(cred, nonce="n" * 32, pad=""))) * 3 // 4 - 8)  # base64: 4 chars per 3 bytes
    for n in range(start, length):
        t = signed(cred, nonce="n" * 32, pad="p" * n)
        for candidate in (t, t + "=="):
            if len(candidate) == length:
                return candidate
    raise AssertionError(f"no padding gives a ticket of {length} characters")


def test_a_ticket_of_exactly_max_ticket_len_is_accepted_and_one_character_more_refused(realm):
    pub, cred, _ = realm
    assert verify_ticket(padded(cred, MAX_TICKET_LEN), pub, AUD, now=NOW).client == cred.host
    with pytest.raises(AuthenticationFailed, match="malformed ticket"):
        verify_ticket(padded(cred, MAX_TICKET_LEN + 1), pub, AUD, now=NOW)


def test_nonce_length_bounds_are_exact(realm):
    pub, cred, _ = realm
    for n in (16, 64):
        assert verify_ticket(signed(cred, nonce="a" * n), pub, AUD, now=NOW).nonce == "a" * n
    for n in (15, 65):
        with pytest.raises(AuthenticationFailed, match="malformed ticket"):
            verify_ticket(signed(cred, nonce="a" * n), pub, AUD, now=NOW)


def test_session_header_counter_digits_bound_is_exact(realm):
    _, _, server = realm
    store = SessionStore(server)
    # 18 digits pass the format check (then the session is unknown); 19 are malformed
    with pytest.raises(AuthenticationFailed, match="unknown or expired session"):
        store.check(f"ReplicadSession {'0' * 32} {'9' * 18} {'0' * 32}", "GET", "/v1/hello", "")
    with pytest.raises(AuthenticationFailed, match="malformed session header"):
        store.check(f"ReplicadSession {'0' * 32} {'9' * 19} {'0' * 32}", "GET", "/v1/hello", "")


def test_open_sessions_are_bounded_exactly(realm, monkeypatch):
    """Per principal, then for the server: the same comparisons, fewer handshakes."""
    _, cred, server = realm
    monkeypatch.setattr(session_mod, "MAX_SESSIONS", 8)
    monkeypatch.setattr(session_mod, "SESSIONS_PER_PEER", 5)
    store = SessionStore(server)
    ticket = Ticket(cred.host, AUD, NOW, 4_000_000_000, "n" * 32, bytes(range(32)))
    for _ in range(5):
        store.room_for(cred.host)
        store.accept(ticket, {})
    with pytest.raises(Busy, match=f"{cred.host} has 5 open sessions"):
        store.room_for(cred.host)
    other = Ticket("vmhost3.contoso.com", AUD, NOW, 4_000_000_000, "m" * 32, bytes(range(32)))
    for _ in range(3):
        store.room_for(other.client)
        store.accept(other, {})
    with pytest.raises(Busy, match="too many open sessions"):
        store.room_for(other.client)

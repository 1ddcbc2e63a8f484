import json
import os
import stat

import pytest

from replicad.auth.token import Credential, RealmPublic, _b64, _unb64, realm_init, realm_issue, verify_ticket
from replicad.errors import AuthenticationFailed


@pytest.fixture
def realm(tmp_path):
    realm_init("contoso.com", tmp_path / "realm")
    realm_issue(tmp_path / "realm", "vmhost1.contoso.com", tmp_path / "h1.cred")
    return RealmPublic.load(tmp_path / "realm" / "realm.pub"), Credential.load(tmp_path / "h1.cred"), tmp_path


def test_files_are_private(realm):
    _, _, d = realm
    assert stat.S_IMODE(os.stat(d / "realm" / "realm.key").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(d / "h1.cred").st_mode) == 0o600


def test_valid_ticket(realm):
    pub, cred, _ = realm
    t = verify_ticket(cred.ticket("vmhost2.contoso.com"), pub, "VMHOST2.contoso.com")
    assert t.client == "vmhost1.contoso.com"


def test_wrong_audience(realm):
    pub, cred, _ = realm
    with pytest.raises(AuthenticationFailed, match="but this host is"):
        verify_ticket(cred.ticket("vmhost3.contoso.com"), pub, "vmhost2.contoso.com")


def test_expired_and_future(realm):
    pub, cred, _ = realm
    import time
    with pytest.raises(AuthenticationFailed, match="expired"):
        verify_ticket(cred.ticket("b.contoso.com", now=time.time() - 3600), pub, "b.contoso.com")
    with pytest.raises(AuthenticationFailed, match="not yet valid"):
        verify_ticket(cred.ticket("b.contoso.com", now=time.time() + 3600), pub, "b.contoso.com")


def test_foreign_realm(realm, tmp_path):
    pub, _, _ = realm
    realm_init("fabrikam.com", tmp_path / "other")
    realm_issue(tmp_path / "other", "vmhost1.contoso.com", tmp_path / "evil.cred")
    evil = Credential.load(tmp_path / "evil.cred")
    with pytest.raises(AuthenticationFailed, match="foreign realm"):
        verify_ticket(evil.ticket("b.contoso.com"), pub, "b.contoso.com")


def test_self_signed_claim_of_another_name_refused(realm, tmp_path):
    """A host cannot rename itself: the realm signed (name, key) together."""
    pub, cred, _ = realm
    body, sig = cred.ticket("b.contoso.com").split(".")
    doc = json.loads(_unb64(body))
    doc["client"] = "vmhost9.contoso.com"
    forged_body = json.dumps(doc, separators=(",", ":")).encode()
    forged = _b64(forged_body) + "." + _b64(cred.key.sign(forged_body))
    with pytest.raises(AuthenticationFailed, match="not signed by realm"):
        verify_ticket(forged, pub, "b.contoso.com")


@pytest.mark.parametrize("token", ["", "abc", "a.b.c", "x" * 5000, "e30.AAAA"])
def test_garbled(realm, token):
    pub, _, _ = realm
    with pytest.raises(AuthenticationFailed):
        verify_ticket(token, pub, "b.contoso.com")


def test_tampered_signature(realm):
    pub, cred, _ = realm
    body, sig = cred.ticket("b.contoso.com").split(".")
    s = bytearray(_unb64(sig))
    s[0] ^= 1
    with pytest.raises(AuthenticationFailed, match="does not verify"):
        verify_ticket(body + "." + _b64(bytes(s)), pub, "b.contoso.com")

"""Which host a Kerberos principal stands for, and the replay key of a Negotiate token
(auth/kerberos.py); the exchange itself is tested with a real KDC in tests/kerberos/."""

import base64

import pytest

from replicad.auth.kerberos import host_of, identity_of, is_person, parse_negotiate, replay_key
from replicad.errors import AuthenticationFailed

REALMS = {"CONTOSO.COM": "contoso.com", "FABRIKAM.COM": "corp.fabrikam.com"}


@pytest.mark.parametrize("principal, host", [
    ("host/vmhost2.contoso.com@CONTOSO.COM", "vmhost2.contoso.com"),
    ("HTTP/VMHost2.Contoso.com@CONTOSO.COM", "vmhost2.contoso.com"),
    ("VMHOST2$@CONTOSO.COM", "vmhost2.contoso.com"),  # an Active Directory machine account
    ("host/hv1.corp.fabrikam.com@FABRIKAM.COM", "hv1.corp.fabrikam.com"),  # kerberos.realms maps it
    ("HV1$@FABRIKAM.COM", "hv1.corp.fabrikam.com"),
])
def test_a_host_principal_names_its_host(principal, host):
    assert host_of(principal, REALMS) == host


@pytest.mark.parametrize("principal, reason", [
    ("host/vmhost2.contoso.com@EVIL.COM", "which this host does not trust"),
    ("host/vmhost2.contoso.com", "not a host principal"),
    ("alice@CONTOSO.COM", "not a host principal"),
    ("ldap/vmhost2.contoso.com@CONTOSO.COM", "not a host principal"),
    ("host/a/b@CONTOSO.COM", "not a host principal"),
    ("host/vmhost2.fabrikam.com@CONTOSO.COM", "names hosts of contoso.com only"),
    ("host/evilcontoso.com@CONTOSO.COM", "names hosts of contoso.com only"),
    ("host/*.contoso.com@CONTOSO.COM", "names no valid host"),
    ("host/vmhost2.contoso.com\n@CONTOSO.COM", "names no valid host"),
    ("host/x\\@y.contoso.com@CONTOSO.COM", "not a host principal"),
    ("$@CONTOSO.COM", "not a host principal"),
])
def test_anything_else_is_refused_with_the_reason(principal, reason):
    with pytest.raises(AuthenticationFailed, match=reason):
        host_of(principal, REALMS)


@pytest.mark.parametrize("principal, identity", [
    ("host/vmhost2.contoso.com@CONTOSO.COM", "vmhost2.contoso.com"),  # a host: its name, as host_of
    ("VMHOST2$@CONTOSO.COM", "vmhost2.contoso.com"),
    ("alice@CONTOSO.COM", "alice@CONTOSO.COM"),                      # a person: itself (management only)
    ("admin/admin@FABRIKAM.COM", "admin/admin@FABRIKAM.COM"),
    ("ldap/vmhost2.contoso.com@CONTOSO.COM", "ldap/vmhost2.contoso.com@CONTOSO.COM"),  # never a host
])
def test_identity_of_a_host_is_its_name_and_of_anyone_else_the_principal(principal, identity):
    assert identity_of(principal, REALMS) == identity
    assert is_person(identity) == ("@" in identity)


@pytest.mark.parametrize("principal, reason", [
    ("alice@EVIL.COM", "which this host does not trust"),
    ("x\\@y@CONTOSO.COM", "not a host principal"),
    ("al ice@CONTOSO.COM", "not a printable name"),
    ("alice\n@CONTOSO.COM", "not a printable name"),
    ("host/vmhost2.fabrikam.com@CONTOSO.COM", "names hosts of contoso.com only"),  # host forms stay hosts
])
def test_identity_of_refuses_what_host_of_refuses_and_unprintable_names(principal, reason):
    with pytest.raises(AuthenticationFailed, match=reason):
        identity_of(principal, REALMS)


def _der(tag: int, body: bytes) -> bytes:
    n = len(body)
    length = bytes([n]) if n < 0x80 else bytes([0x82]) + n.to_bytes(2, "big")
    return bytes([tag]) + length + body


KRB5_OID = _der(0x06, bytes.fromhex("2a864886f712010202"))
SPNEGO_OID = _der(0x06, bytes.fromhex("2b0601050502"))


def _ap_req(cipher: bytes, ticket: bytes = b"T" * 300) -> bytes:
    authenticator = _der(0x30, _der(0xA0, _der(0x02, b"\x12")) + _der(0xA2, _der(0x04, cipher)))
    ap = _der(0x6E, _der(0x30, _der(0xA0, _der(0x02, b"\x05")) + _der(0xA1, _der(0x02, b"\x0e"))
                     + _der(0xA3, ticket) + _der(0xA4, authenticator)))
    return _der(0x60, KRB5_OID + b"\x01\x00" + ap)


def _spnego(inner: bytes, mechs: bytes = KRB5_OID) -> bytes:
    init = _der(0x30, _der(0xA0, _der(0x30, mechs)) + _der(0xA2, _der(0x04, inner)))
    return _der(0x60, SPNEGO_OID + _der(0xA0, init))


def test_the_replay_key_is_the_authenticator_however_wrapped():
    cipher = b"C" * 200
    key = replay_key(_ap_req(cipher))
    assert replay_key(_spnego(_ap_req(cipher))) == key
    assert replay_key(_spnego(_ap_req(cipher), mechs=KRB5_OID + KRB5_OID)) == key  # another mech list
    assert replay_key(_spnego(_ap_req(cipher, ticket=b"U" * 300))) == key  # another ticket, same authenticator
    assert replay_key(_spnego(_ap_req(b"D" * 200))) != key


@pytest.mark.parametrize("token", [b"", b"\x60", b"\x60\x05\x06\x03\x2a\x86\x48", _ap_req(b"C" * 200)[:-10],
                                   _der(0x60, SPNEGO_OID + _der(0xA1, b"")), b"\x30\x00" + b"x" * 50,
                                   _der(0x60, _der(0x06, b"\x2b\x06\x01") + b"\x01\x00")])
def test_a_token_that_is_no_ap_req_is_refused(token):
    with pytest.raises(AuthenticationFailed, match="malformed Negotiate token"):
        replay_key(token)


@pytest.mark.parametrize("header", ["Negotiate ", "Negotiate !!!", "Negotiate " + "A" * 20000])
def test_a_malformed_negotiate_header_is_refused(header):
    with pytest.raises(AuthenticationFailed, match="malformed Negotiate token"):
        parse_negotiate(header)


def test_a_negotiate_header_gives_its_token():
    assert parse_negotiate("Negotiate " + base64.b64encode(b"abc").decode()) == b"abc"


class _GssError(Exception):
    def __init__(self, text: str):
        self.text = text

    def gen_message(self) -> str:
        return self.text


@pytest.mark.parametrize("text, shown", [
    ("Major (851968): Unspecified GSS failure.  Minor code may provide more information, Minor (100005): "
     "Cannot contact any KDC for realm 'CONTOSO.COM'", "Cannot contact any KDC for realm 'CONTOSO.COM'"),
    ("Major (786432): The referenced context has expired, Minor (100005): Success",
     "The referenced context has expired"),
    ("something else\nentirely", "something else entirely"),
])
def test_a_gss_error_is_shown_by_what_it_says(text, shown):
    from replicad.auth.kerberos import _message

    assert _message(_GssError(text)) == shown

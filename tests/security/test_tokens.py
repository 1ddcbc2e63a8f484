"""Token mode (port 80): tickets, replays, sessions, mutual authentication, MACs in flight."""

import base64
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from replicad.auth.session import MAC_HEADER, SIGNATURE_HEADER, ClientHandshake, _b64
from replicad.auth.token import Credential, RealmPublic, realm_init, realm_issue

from ..integration.harness import file_digest, free_port, replica_disk, wait_applied
from ..integration.images import make_sparse_image, scribble
from .helpers import assert_unchanged, http_request, replica_pair, snapshot
from .proxy import FlipProxy

pytestmark = pytest.mark.integration
MiB = 1 << 20


@pytest.fixture
def token_pair(tmp_path):
    c = replica_pair(tmp_path, "token")
    yield c, c["vmhost1"], c["vmhost2"]
    c.shutdown()


def cred(host) -> Credential:
    return Credential.load(host.root / f"{host.fqdn}.cred")


def realm(c) -> RealmPublic:
    return RealmPublic.load(c.root / "realm" / "realm.pub")


def open_session(v1, ticket: str):
    return http_request(v1, "POST", "/v1/session", {"Authorization": f"Replicad {ticket}"})


@pytest.mark.parametrize("case", ["missing", "garbled", "expired", "wrong-audience", "foreign-realm", "tampered"])
def test_bad_tickets_are_refused_and_nothing_changes(token_pair, tmp_path, case):
    c, v1, v2 = token_pair
    before = snapshot(v1)
    me = cred(v2)
    if case == "missing":
        headers = {}
    else:
        if case == "garbled":
            t = "not.a-ticket"
        elif case == "expired":
            t = me.ticket(v1.fqdn, now=time.time() - 3600)
        elif case == "wrong-audience":
            t = me.ticket("vmhost3.contoso.com")
        elif case == "foreign-realm":
            realm_init("fabrikam.com", tmp_path / "other")
            realm_issue(tmp_path / "other", v2.fqdn, tmp_path / "evil.cred")
            t = Credential.load(tmp_path / "evil.cred").ticket(v1.fqdn)
        else:
            body, sig = me.ticket(v1.fqdn).split(".")
            t = body[:-2] + ("A" if body[-2] != "A" else "B") + body[-1] + "." + sig
        headers = {"Authorization": f"Replicad {t}"}
    status, doc, _ = http_request(v1, "POST", "/v1/session", headers)
    assert status == 401 and doc["code"] == "unauthenticated"
    # a change log sent with that credential is refused as well, before its body is read
    status, _, _ = http_request(v1, "PUT", "/v1/replicas/0f0e0d0c-0000-4000-8000-000000000001/logs/1", headers,
                                body=b"RPLG" + b"\0" * 4000)
    assert status == 401
    assert_unchanged(before, snapshot(v1))
    assert v1.events("peer.unauthenticated")


def test_a_replayed_ticket_is_refused_also_after_a_restart(token_pair):
    c, v1, v2 = token_pair
    hs = ClientHandshake.begin(cred(v2), v1.fqdn)
    assert open_session(v1, hs.ticket)[0] == 200
    status, doc, _ = open_session(v1, hs.ticket)
    assert status == 401 and "replayed ticket" in doc["error"]
    v1.stop()
    v1.start()
    status, doc, _ = open_session(v1, hs.ticket)
    assert status == 401 and "replayed ticket" in doc["error"]


def test_session_requests_are_maced_and_not_replayable(token_pair):
    c, v1, v2 = token_pair
    hs = ClientHandshake.begin(cred(v2), v1.fqdn)
    status, _, headers = open_session(v1, hs.ticket)
    sess = hs.finish(realm(c), headers["raw-body"], headers[SIGNATURE_HEADER])
    auth, counter = sess.authorization("GET", "/v1/hello", None)
    status, doc, rh = http_request(v1, "GET", "/v1/hello", {"Authorization": auth})
    assert status == 200 and doc["principal"] == v2.fqdn
    assert rh[MAC_HEADER] == sess.response_mac(counter, 200, rh["raw-body"])
    status, doc, _ = http_request(v1, "GET", "/v1/hello", {"Authorization": auth})  # the same request again
    assert status == 401 and "replayed request" in doc["error"]
    forged = auth.rsplit(" ", 1)[0] + " " + "0" * 32
    ahead = forged.replace(f" {counter} ", f" {counter + 5} ")
    assert http_request(v1, "GET", "/v1/hello", {"Authorization": ahead})[0] == 401
    other_path, _ = sess.authorization("GET", "/v1/hello", None)  # a MAC for another path
    status, _, _ = http_request(v1, "GET", "/v1/replicas/0f0e0d0c-0000-4000-8000-000000000001",
                                {"Authorization": other_path})
    assert status == 401


class _Impostor(BaseHTTPRequestHandler):
    """Answers the session handshake as a replica that is not the one dialled."""

    variant = "other-name"
    credential: Credential = None

    def do_POST(self):  # noqa: N802
        ticket = self.headers["Authorization"].split(" ", 1)[1]
        doc = json.loads(base64.urlsafe_b64decode(ticket.split(".")[0] + "=="))
        me = self.credential
        server = me.host if self.variant == "other-name" else "vmhost1.contoso.com"
        body = json.dumps({"v": 1, "session": "ab" * 16, "server": server, "client": doc["client"],
                           "client_nonce": doc["nonce"], "nonce": "cd" * 16, "eph": doc["eph"],
                           "pub": _b64(me.public_bytes), "assertion": _b64(me.assertion), "expires": time.time() + 60,
                           "authorized": True}).encode()
        sig = _b64(me.sign(body))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header(SIGNATURE_HEADER, sig)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


@pytest.mark.parametrize("variant,expected", [("other-name", "answered as vmhost2.contoso.com"),
                                              ("claims-the-name", "not signed by realm")])
def test_an_impostor_replica_fails_mutual_authentication(token_pair, variant, expected):
    c, v1, v2 = token_pair
    port = free_port("127.0.0.1")
    handler = type("H", (_Impostor,), {"variant": variant, "credential": cred(v2)})
    srv = ThreadingHTTPServer(("127.0.0.1", port), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        r = v2.cli("replication", "test-connection", "--replica-server", v1.fqdn, "--replica-port", str(port),
                   check=False)
    finally:
        srv.shutdown()
        srv.server_close()
    assert r.returncode == 1 and "failed mutual authentication" in r.stderr and expected in r.stderr, r.stderr


@pytest.fixture
def proxied(token_pair, tmp_path):
    """contoso2 replicated from vmhost2 to vmhost1 through a byte-flipping proxy."""
    c, v1, v2 = token_pair
    port = free_port("127.0.0.1")
    with FlipProxy(("127.0.0.1", port), (v1.addr, v1.port)) as proxy:
        image = tmp_path / "contoso2.img"
        make_sparse_image(image, 16 * MiB, data_pieces=4)
        v2.cli("vm", "add", "contoso2", "--disk", str(image))
        v2.cli("replication", "enable", "contoso2", "--replica-server", v1.fqdn, "--replica-port", str(port),
               "--frequency", "3600")
        v2.json("replication", "start-initial", "contoso2", "--wait")
        wait_applied(v2, v1, "contoso2")
        yield c, v1, v2, proxy, image


def test_a_flipped_byte_in_a_log_is_detected_and_nothing_applied(proxied):
    c, v1, v2, proxy, image = proxied
    copy = replica_disk(v1, "contoso2")
    before = file_digest(copy)
    scribble(image, 100, seed=1)
    proxy.flip_request_at = 3000  # inside the first record's data
    r = v2.cli("replication", "sync", "contoso2", "--wait", check=False)
    assert proxy.flipped == 1
    assert r.returncode == 1 and ("MAC mismatch" in r.stderr or "checksum" in r.stderr), r.stderr
    assert file_digest(copy) == before
    assert v1.json("replication", "get", "contoso2")["applied_sequence"] == 1
    assert not [p for p in (copy.parent.parent / "logs").iterdir()]
    assert v1.events("log.rejected")
    assert v2.json("replication", "measure", "contoso2")["errors"] == 1
    r = v2.json("replication", "sync", "contoso2", "--wait")  # the log is sent again, whole
    wait_applied(v2, v1, "contoso2")
    assert file_digest(copy) == file_digest(image)


def test_a_forged_acknowledgement_is_detected_and_reconciled(proxied):
    """A flipped byte in the replica's answer: the primary does not trust it (MAC), and the
    next cycle learns from the replica what it really holds — no resync, no full copy."""
    c, v1, v2, proxy, image = proxied
    scribble(image, 100, seed=2)
    proxy.flip_answer_at = 5
    r = v2.cli("replication", "sync", "contoso2", "--wait", check=False)
    assert proxy.flipped == 1
    assert r.returncode == 1 and "not authenticated (MAC mismatch)" in r.stderr, r.stderr
    assert v2.json("replication", "get", "contoso2")["sequence"] == 1  # baseline did not advance
    scribble(image, 10, seed=3)
    r = v2.json("replication", "sync", "contoso2", "--wait")
    assert r["seq"] == 3 and r["bytes_sent"] < 100 * 4096
    assert v2.events("baseline.promoted")
    wait_applied(v2, v1, "contoso2")
    assert file_digest(replica_disk(v1, "contoso2")) == file_digest(image)
    assert v2.json("replication", "get", "contoso2")["state"] == "Replicating"

"""What an unauthenticated host can hold on a peer listener (issue 13, "also check":
file-descriptor exhaustion with the default idle timeout). Before, a host that opened a
few hundred TCP connections and said nothing held a descriptor each for the 60 s idle
timeout: the replica ran out of descriptors (`accept` failing, files failing to open) and
its primaries' cycles stalled behind it. vmhost1 runs with 256 descriptors to make the
limit near; the attacker connects from 127.0.0.5."""

import socket
import time

import pytest

from ..integration.harness import Cluster
from .helpers import replicate_ledger, tls_context

pytestmark = pytest.mark.integration
MiB = 1 << 20


@pytest.fixture(params=["token", "certificate"])
def small_replica(tmp_path, request):
    c = Cluster(tmp_path, names=("vmhost1", "vmhost2"), auth=request.param)
    v1, v2 = c["vmhost1"], c["vmhost2"]
    v1.wrap = ["prlimit", "--nofile=256:256"]
    v1.start()
    v2.start()
    replicate_ledger(c, v1, v2, tmp_path)
    yield c, v1, v2
    c.shutdown()


def silent_connections(v1, port: int, n: int) -> list[socket.socket]:
    """``n`` connections from another address that never say a word (no TLS handshake
    either); the ones the listener refused at once are gone already."""
    out = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.5", 0))
        s.settimeout(5)
        try:
            s.connect((v1.addr, port))
        except OSError:
            s.close()
            continue
        out.append(s)
    return out


def test_silent_connections_cannot_take_every_descriptor(small_replica):
    c, v1, v2 = small_replica
    port = v1.peer_port
    held = silent_connections(v1, port, 400)
    try:
        t0 = time.monotonic()
        v2.json("replication", "sync", "ledger", "--wait")  # its own cycle: connections and files
        took = time.monotonic() - t0
        assert v1.json("vm", "list")[0]["name"] == "ledger"  # the local socket answers too
        # the listener turned the flood away at once, before it could cost the replica its files
        alive = 0
        for s in held:
            try:
                s.setblocking(False)
                alive += s.recv(1) != b""
            except BlockingIOError:
                alive += 1
            except OSError:
                pass
        assert alive <= 64, f"{alive} silent connections from one address still open"
    finally:
        for s in held:
            s.close()
    assert took < 10, f"the cycle took {took:.1f}s"
    text = v1.log.read_text()
    assert "Too many open files" not in text and "out of system resource" not in text, text[-2000:]
    full = [ev for ev in v1.events("listener.full")]
    assert full and full[0]["address"] == "127.0.0.5", full[:1]


@pytest.mark.slow  # long: `make test-slow` (.ci/run runs it); README, Development
def test_a_connection_that_never_sends_its_request_is_closed_at_the_header_deadline(small_replica):
    """An unauthenticated connection holds a descriptor for the header deadline (10 s by
    default), not the 60 s idle timeout: the head of its first request (and on TLS the
    handshake) must be in by then."""
    c, v1, _ = small_replica
    s = socket.create_connection((v1.addr, v1.peer_port), timeout=30)
    if c.auth == "certificate":  # a handshake, then silence
        certs = c["vmhost2"].root / "certs"
        s = tls_context(c.root / "ca" / "ca.pem", certs / "vmhost2.contoso.com.pem",
                        certs / "vmhost2.contoso.com.key").wrap_socket(s, server_hostname=v1.fqdn)
    s.sendall(b"GET /v1/hello HTTP/1.1\r\nHost: x\r\n")  # and never the end of the head
    t0 = time.monotonic()
    try:
        assert s.recv(100) == b""
    except (ConnectionResetError, OSError):
        pass
    finally:
        s.close()
    assert 8 < time.monotonic() - t0 < 20

"""The authentication mode and the port of a relationship go together (issue 15, item 4):
`replication set --auth` without `--replica-port` moves to the new mode's default port, a
port that is the other listener says so, and the replica shows the port really used."""

import pytest

from .harness import wait_applied
from .images import make_sparse_image

pytestmark = pytest.mark.integration
MiB = 1 << 20


def test_switching_mode_moves_the_port_and_a_mismatch_names_the_listener(two_host_pair, tmp_path):
    primary, replica = two_host_pair
    replica.cli("server", "set", "--auth", "both")
    image = tmp_path / "ap.img"
    make_sparse_image(image, 4 * MiB, data_pieces=1)
    primary.cli("vm", "add", "ap", "--disk", str(image))
    primary.cli("replication", "enable", "ap", "--replica-server", replica.fqdn, "--replica-port", str(replica.port))
    primary.json("replication", "start-initial", "ap", "--wait")
    wait_applied(primary, replica, "ap")
    got = replica.json("replication", "get", "ap")
    assert (got["auth"], got["replica_port"]) == ("token", replica.port)

    # no --replica-port: the new mode's default, as `enable` and `test-connection` choose it
    got = primary.json("replication", "set", "ap", "--auth", "certificate")
    assert (got["auth"], got["replica_port"]) == ("certificate", 443)
    primary.json("replication", "set", "ap", "--replica-port", str(replica.tls_port))
    primary.json("replication", "sync", "ap", "--wait")
    wait_applied(primary, replica, "ap")
    got = replica.json("replication", "get", "ap")
    assert (got["auth"], got["replica_port"]) == ("certificate", replica.tls_port)  # not the token port

    # certificates to the token listener
    primary.json("replication", "set", "ap", "--replica-port", str(replica.port))
    r = primary.cli("replication", "sync", "ap", "--wait", check=False)
    assert r.returncode == 1
    assert (f"port {replica.port} of {replica.fqdn} answers plain HTTP: it is the token listener; "
            "use the TLS listener's port (443 by default) for certificate authentication") in r.stderr, r.stderr
    assert "WRONG_VERSION_NUMBER" not in primary.json("replication", "get", "ap")["error"]

    # a token to the TLS listener: the cycle, and test-connection
    got = primary.json("replication", "set", "ap", "--auth", "token", "--replica-port", str(replica.tls_port))
    assert got["replica_port"] == replica.tls_port  # an explicit port wins
    r = primary.cli("replication", "sync", "ap", "--wait", check=False)
    want = (f"port {replica.tls_port} of {replica.fqdn} answers TLS: it is the certificate listener; "
            "use the token listener's port (80 by default) for token authentication")
    assert r.returncode == 1 and want in r.stderr, r.stderr
    assert want in primary.json("replication", "get", "ap")["error"]
    r = primary.cli("replication", "test-connection", "--replica-server", replica.fqdn, "--replica-port",
                    str(replica.tls_port), "--auth", "token", check=False)
    assert r.returncode == 1 and want in r.stderr, r.stderr

    primary.json("replication", "set", "ap", "--replica-port", str(replica.port))
    primary.json("replication", "sync", "ap", "--wait")
    assert primary.json("replication", "get", "ap")["error"] is None

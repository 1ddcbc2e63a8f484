"""A flipped byte on the certificate (TLS) listener (issue 6, scenario 5): TLS's record MAC
catches it, the connection ends, nothing of that log is applied, the primary counts the
error and sends the log again, whole. (The token listener's case, where replicad's own
item MACs catch it: tests/security/test_tokens.py.)"""

import pytest

from tests.integration.conftest import article_pair
from tests.integration.harness import Cluster, file_digest, free_port, replica_disk, wait_applied
from tests.integration.images import make_sparse_image, scribble
from tests.security.proxy import FlipProxy

pytestmark = pytest.mark.integration
MiB = 1 << 20


def test_a_flipped_byte_on_the_tls_listener_is_detected_and_nothing_applied(tmp_path):
    c = Cluster(tmp_path, names=("vmhost1", "vmhost2"), auth="certificate")
    try:
        primary, replica = article_pair(c)
        port = free_port(replica.addr)
        with FlipProxy((replica.addr, port), (replica.addr, replica.tls_port)) as proxy:
            image = tmp_path / "t.img"
            make_sparse_image(image, 32 * MiB, data_pieces=8)
            primary.cli("vm", "add", "t", "--disk", str(image))
            primary.cli("replication", "enable", "t", "--replica-server", replica.fqdn, "--replica-port", str(port),
                        "--auth", "certificate", "--frequency", "3600")
            primary.json("replication", "start-initial", "t", "--wait")
            wait_applied(primary, replica, "t")
            copy = replica_disk(replica, "t")
            before = file_digest(copy)

            scribble(image, 1000, seed=51)  # ~4 MB: only the log's connection gets 1 MiB far
            proxy.flip_stream_at = 1 * MiB
            r = primary.cli("replication", "sync", "t", "--wait", check=False)
            assert proxy.flipped == 1
            assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
            assert file_digest(copy) == before  # nothing of that log applied
            assert replica.json("replication", "get", "t")["applied_sequence"] == 1
            assert not [p for p in (copy.parent.parent / "logs").iterdir()]
            assert primary.json("replication", "measure", "t")["errors"] == 1
            refused = replica.events("log.rejected")
            assert refused and "corrupted in transit" in refused[-1]["reason"], refused
            result = primary.json("replication", "sync", "t", "--wait")  # sent again, whole
            assert result["kind"] == "delta"
            wait_applied(primary, replica, "t")
            assert file_digest(copy) == file_digest(image)
    finally:
        c.shutdown()

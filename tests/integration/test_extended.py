"""Extended replication (issue 4 item 8): a replica server forwards its copy of a VM to a
third host, which shows it in mode ExtendedReplica. The forwarded copy is always read at a
committed point of the replica, so the third copy is at a cycle boundary of the first."""

from pathlib import Path

import pytest

from .harness import file_digest, wait_for
from .images import scribble
from .test_replication import replicated

pytestmark = pytest.mark.integration
MiB = 1 << 20


def wait_extended(middle, third, vm):
    seq = middle.json("replication", "get", vm, "--extended")["sequence"]
    wait_for(lambda: third.json("replication", "get", vm)["applied_sequence"] >= seq, 60,
             f"{vm} applied up to {seq} on {third.name}", interval=0.1)


@pytest.mark.slow  # long: `make test-slow` (.ci/run runs it); README, Development
def test_a_replica_forwards_its_copy_to_a_third_host(token_pair, tmp_path):
    primary, middle = token_pair  # vmhost2 -> vmhost1
    third = middle.cluster["vmhost3"]
    third.start()
    third.cli("server", "set", "--enabled", "true", "--auth", "token")
    image, copy = replicated(primary, middle, "contoso2", tmp_path, 32 * MiB, 8, frequency=3600)

    r = middle.cli("replication", "enable", "contoso2", "--replica-server", primary.fqdn, check=False)
    assert r.returncode == 2 and "third host" in r.stderr
    got = middle.json("replication", "enable", "contoso2", "--replica-server", third.fqdn, "--replica-port",
                      str(third.peer_port), "--auth", "token", "--frequency", "3600")
    assert (got["relationship"], got["mode"], got["state"]) == ("Extended", "Primary", "ReadyForInitialReplication")
    own = middle.json("replication", "get", "contoso2")
    assert (own["relationship"], own["mode"], own["state"]) == ("Simple", "Replica", "Replicating")
    assert len(middle.json("replication", "get")) == 2
    r = middle.cli("replication", "enable", "contoso2", "--replica-server", third.fqdn, check=False)
    assert r.returncode == 1 and "extended replication is already enabled" in r.stderr

    res = middle.json("replication", "start-initial", "contoso2", "--wait")  # a primary's command: the extended one
    assert res["kind"] == "initial"
    wait_extended(middle, third, "contoso2")
    far = third.json("vm", "get", "contoso2")
    assert far["replication_mode"] == "ExtendedReplica"
    assert third.json("replication", "get", "contoso2")["mode"] == "ExtendedReplica"
    assert third.json("replication", "get", "contoso2")["primary_server"] == middle.fqdn
    far_copy = Path(far["disks"][0]["path"])
    assert file_digest(far_copy) == file_digest(image)
    r = third.cli("vm", "start", "contoso2", check=False)
    assert r.returncode == 1 and "replica VM" in r.stderr
    # the third host's unplanned failover asks the middle one (its primary), whose replica VM is off
    dry = third.json("failover", "start", "contoso2", "--dry-run")
    assert (dry["primary"], dry["failover"], dry["differing_blocks"]) == ("off", "would proceed", 0), dry

    # applied cycles are forwarded: only what changed since the last forwarded point
    scribble(image, 40, seed=31)
    primary.json("replication", "sync", "contoso2", "--wait")
    wait_for(lambda: middle.json("replication", "get", "contoso2")["applied_sequence"] >= 2, 30, "the apply")
    res = middle.json("replication", "sync", "contoso2", "--wait")
    assert res["kind"] == "delta" and 0 < res["data_bytes"] <= 40 * 4096
    wait_extended(middle, third, "contoso2")
    assert file_digest(far_copy) == file_digest(copy) == file_digest(image)
    m = middle.json("replication", "measure", "contoso2", "--extended")
    assert m["successful_count"] == 2 and m["initial_replication_size"] > 0

    # the replica's own relationship is untouched by the extended one, and vice versa
    middle.json("replication", "suspend", "contoso2", "--extended")
    assert middle.json("replication", "get", "contoso2")["state"] == "Replicating"
    assert middle.json("replication", "get", "contoso2", "--extended")["state"] == "Suspended"
    for cmd in (("vm", "remove", "contoso2"), ("replication", "remove", "contoso2")):
        r = middle.cli(*cmd, check=False)
        assert r.returncode == 1 and "remove that first" in r.stderr
    middle.json("replication", "remove", "contoso2", "--extended")
    assert middle.json("vm", "get", "contoso2")["replication_mode"] == "Replica"
    r = middle.cli("replication", "get", "contoso2", "--extended", check=False)
    assert r.returncode == 1 and "no extended replication" in r.stderr

"""No split brain (issue 19.4) on loopback, three real daemons: an unplanned failover asks
the primary whether the VM runs there and is refused while it does; a witness asked from
another place says so when the replica cannot reach the primary; only the replica server,
or the primary's own witness on its behalf, may ask (403 and a log line naming anyone
else); `--force` goes past the refusal. The link-down and fencing cases, in network
namespaces: tests/faults/test_split_brain_netns.py."""

import json

import pytest

from ..security.test_remote_management import manager, remote
from .harness import Cluster, wait_applied
from .test_replication import replicated

pytestmark = pytest.mark.integration
MiB = 1 << 20


@pytest.fixture(params=["token", "certificate"])
def trio(tmp_path, request):
    c = Cluster(tmp_path, names=("vmhost1", "vmhost2", "vmhost3"), auth=request.param)
    try:
        for name in ("vmhost1", "vmhost2", "vmhost3"):
            c[name].start()
        c["vmhost1"].cli("server", "set", "--enabled", "true", "--auth", c.auth)
        c["vmhost3"].cli("server", "set", "--enabled", "true", "--auth", c.auth)  # the witness hears the replica
        yield c["vmhost2"], c["vmhost1"], c["vmhost3"]  # primary, replica, witness
    finally:
        c.shutdown()


def test_refused_while_the_primary_runs_it_as_the_witness_sees_it_and_forced(trio, tmp_path):
    primary, replica, witness = trio
    replicated(primary, replica, "sb", tmp_path, frequency=3600)
    primary.cli("vm", "start", "sb")

    r = replica.cli("failover", "start", "sb", check=False)
    assert r.returncode == 1 and "refused: sb runs on vmhost2.contoso.com" in r.stderr, r.stderr
    assert replica.json("replication", "get", "sb")["state"] == "Replicating"
    [asked] = primary.events("failover.question")
    assert asked["peer"] == replica.fqdn and asked["running"] is True
    assert replica.events("failover.refused")[-1]["result"] == "running"
    # the same through remote management (-C), with --dry-run's answer
    mgmt = manager(primary.cluster, "mgmt", primary.cluster.auth)
    r = remote(mgmt, replica, "failover", "start", "sb")
    assert r.returncode == 1 and "refused: sb runs on vmhost2.contoso.com" in r.stderr, r.stderr
    r = remote(mgmt, replica, "failover", "start", "sb", "--dry-run", "-o", "json")
    dry = json.loads(r.stdout)
    assert (dry["primary"], dry["failover"], dry["common_point"], dry["differing_blocks"]) == (
        "running", "would be refused", 1, 0), dry

    # the witness asks the primary from where it stands; the primary tells only its own witness (even a
    # host it would take replication from gets 403 for a VM it does not replicate)
    primary.cli("server", "set", "--enabled", "true", "--auth", primary.cluster.auth)
    replica.cli("server", "set", "--witness", f"{witness.fqdn}:{witness.peer_port}")
    assert replica.json("server", "get")["witness"] == f"{witness.fqdn}:{witness.peer_port}"
    r = replica.cli("failover", "start", "sb", check=False)
    assert r.returncode == 1, r.stderr
    [refused] = primary.events("failover.question_refused")
    assert refused["peer"] == witness.fqdn and refused["on_behalf_of"] == replica.fqdn

    # the replica loses its way to the primary (its name leads nowhere); the witness still reaches it
    replica.stop()
    replica.write_config(resolve={primary.fqdn: "127.0.0.250", witness.fqdn: witness.addr})
    replica.start()
    primary.cli("server", "set", "--witness", witness.fqdn)
    r = replica.cli("failover", "start", "sb", check=False)
    assert r.returncode == 1 and "runs on vmhost2.contoso.com (as vmhost3.contoso.com sees it)" in r.stderr, r.stderr
    heard = replica.events("failover.refused")[-1]
    assert heard["witness"]["running"] is True and heard["primary_reached"] is False

    # a plan's failover asks the same, and stops at that VM
    replica.cli("plan", "add", "shop", "--vm", "sb")
    r = replica.cli("plan", "failover", "shop", "--wait", check=False)
    assert r.returncode == 1 and "stopped at sb (failover)" in r.stderr and "runs on vmhost2" in r.stderr, r.stderr

    # the operator knows better: --force
    r = replica.cli("failover", "start", "sb", "--force", "-o", "json")
    got = json.loads(r.stdout)
    assert got["state"] == "FailedOverWaitingCompletion"
    assert got["split_brain"]["forced"] is True and got["split_brain"]["primary"]["reached"] is False
    assert replica.events("failover.split_brain_check")[-1]["forced"] is True


def test_a_planned_failover_asks_nothing(two_host_pair, tmp_path):
    primary, replica = two_host_pair
    replicated(primary, replica, "pl", tmp_path, frequency=3600)
    primary.cli("vm", "stop", "pl")
    primary.json("failover", "start", "pl", "--prepare")
    wait_applied(primary, replica, "pl")
    assert replica.json("failover", "start", "pl")["state"] == "FailedOverWaitingCompletion"
    assert primary.events("failover.question") == []

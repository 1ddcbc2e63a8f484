"""Filters and bulk (issue 20, item 5) through the real CLI: `replication get/measure/
suspend/resume` take a shell-style pattern, `--all`, `--state`, `--health` and
`--trust-group`, as Hyper-V's cmdlets do; a refusal for one VM is said and the others go
on (exit 1); `auth-entry remove --trust-group` removes a group's entries."""

import json

import pytest

from .test_replication import enable, replicated

pytestmark = pytest.mark.integration
MiB = 1 << 20


def names(docs) -> list[str]:
    return sorted(d["vm"] for d in docs)


def test_patterns_filters_and_all_on_both_sides(two_host_pair, tmp_path):
    primary, replica = two_host_pair
    for vm in ("contoso1", "contoso2"):
        replicated(primary, replica, vm, tmp_path, MiB, 1, frequency=3600)
    (tmp_path / "web.img").write_bytes(bytes(MiB))
    enable(primary, replica, "web", tmp_path / "web.img")  # no initial copy: Warning, not suspendable

    assert names(primary.json("replication", "suspend", "contoso*")) == ["contoso1", "contoso2"]
    assert names(primary.json("replication", "get", "--state", "suspended")) == ["contoso1", "contoso2"]
    assert names(primary.json("replication", "get", "--health", "Warning")) == ["contoso1", "contoso2", "web"]
    assert names(primary.json("replication", "get", "c?ntoso[2]")) == ["contoso2"]
    r = primary.cli("replication", "resume", "--all", "-o", "json", check=False)
    assert r.returncode == 1 and "error: web: replication of web is not suspended" in r.stderr
    assert names(json.loads(r.stdout)) == ["contoso1", "contoso2"]  # the others went on
    assert {d["state"] for d in primary.json("replication", "get", "contoso*")} == {"Replicating"}
    measured = primary.json("replication", "measure", "--state", "Replicating")
    assert names(measured) == ["contoso1", "contoso2"] and all("successful_count" in m for m in measured)
    assert primary.json("replication", "measure", "nothing*") == []
    usage = primary.cli("replication", "suspend", check=False)
    assert usage.returncode == 2 and "--all" in usage.stderr

    assert names(replica.json("replication", "get", "--trust-group", "Production")) == ["contoso1", "contoso2"]
    assert replica.json("replication", "get", "--trust-group", "Lab") == []
    assert names(replica.json("replication", "suspend", "--trust-group", "Production")) == ["contoso1", "contoso2"]
    assert replica.json("auth-entry", "remove", "--trust-group", "Production")["removed"] == ["*.contoso.com"]
    assert replica.json("auth-entry", "list") == []
    gone = replica.cli("auth-entry", "remove", "--trust-group", "Production", check=False)
    assert gone.returncode == 1 and "no authorization entry in trust group" in gone.stderr

"""A plan's consistency group in the management API (issue 19 item 3): which plans may be a
group (one primary host, one replica server, replicated VMs, one group each), and which
group point a `plan failover` takes every VM to — never a mix, also when a failed run is
resumed, and each VM's newest point after a planned failover's prepare."""

from types import SimpleNamespace

import pytest
from tests.unit.test_group_points import MEMBERS, commit, replicas

from replicad.api import plan_groups
from replicad.catalog import Catalog
from replicad.errors import Conflict, UsageError
from replicad.model import VM, Relationship, ReplicationState


def host(cat: Catalog):
    return SimpleNamespace(catalog=cat, config=SimpleNamespace(host="vmhost2.contoso.com"))


def plan(**kw) -> dict:
    return {"name": "shop", "vms": [{"vm": m.removeprefix("id-"), "delay": 0} for m in MEMBERS],
            "consistency": "group", "group_id": "g1", **kw}


async def primaries(cat: Catalog, servers: dict[str, str]) -> None:
    for name, server in servers.items():
        await cat.put_vm(VM(f"id-{name}", name))
        await cat.put_relationship(Relationship(f"id-{name}", "primary", state=ReplicationState.REPLICATING,
                                                replica_server=server, seq=3))


async def test_a_group_shares_one_replica_server_and_its_vms_are_replicated(tmp_path):
    cat = Catalog(tmp_path / "catalog.sqlite")
    await primaries(cat, {"db": "vmhost1", "app": "vmhost1", "web": "vmhost3"})
    await cat.put_vm(VM("id-lone", "lone"))
    h = host(cat)
    two = [{"vm": "db", "delay": 0}, {"vm": "app", "delay": 0}]
    plan_groups.check_setting(h, plan(), two, "group", {})  # one replica server: fine
    with pytest.raises(Conflict, match="more than one replica server"):
        plan_groups.check_setting(h, plan(), two + [{"vm": "web", "delay": 0}], "group", {})
    with pytest.raises(Conflict, match="lone is not replicated"):
        plan_groups.check_setting(h, plan(), two + [{"vm": "lone", "delay": 0}], "group", {})
    with pytest.raises(UsageError, match="2 to 32"):
        plan_groups.check_setting(h, plan(), two[:1], "group", {})
    with pytest.raises(UsageError, match="--consistency is one of"):
        plan_groups.check_setting(h, plan(), two, "crash", {})
    other = {"other": {"name": "other", "vms": two[1:], "consistency": "group"}}
    with pytest.raises(Conflict, match="app is already in plan other's consistency group"):
        plan_groups.check_setting(h, plan(), two, "group", other)
    plan_groups.check_setting(h, plan(), two + [{"vm": "web", "delay": 0}], "none", other)  # none: always
    rel = cat.relationship("id-app")
    rel.source_vm = "id-x"
    await cat.put_relationship(rel)
    with pytest.raises(Conflict, match="extended replication"):
        plan_groups.check_setting(h, plan(), two, "group", {})


async def test_a_plan_failover_takes_every_vm_to_one_group_point(tmp_path):
    from replicad.replica.applier import Applier
    cat = Catalog(tmp_path / "catalog.sqlite")
    await replicas(cat, tmp_path)
    applier = Applier(cat, tmp_path, lambda at: None)
    for gseq, (db, app, web) in {1: (2, 2, 2), 2: (3, 3, 3), 3: (4, 4, 4)}.items():
        t = f"2026-11-30T02:00:{gseq}0Z"
        for vm_id, seq in zip(MEMBERS, (db, app, web), strict=True):
            await commit(applier, vm_id, seq, gseq, time=t)
    await commit(applier, "id-db", 5, 4, time="2026-11-30T02:00:40Z")  # group 4: db's only
    h = host(cat)
    newest = plan_groups.choose(h, plan(), {})
    assert newest["group_seq"] == 3 and newest["points"] == {"id-db": 4, "id-app": 4, "id-web": 4}
    assert plan_groups.choose(h, plan(), {"group_seq": 1})["points"] == dict.fromkeys(MEMBERS, 2)
    assert plan_groups.choose(h, plan(), {"recovery_point": "2026-11-30T02:00:25Z"})["group_seq"] == 2
    with pytest.raises(Conflict, match="no complete group point 4"):
        plan_groups.choose(h, plan(), {"group_seq": 4})
    with pytest.raises(Conflict, match="no complete group point at or before"):
        plan_groups.choose(h, plan(), {"recovery_point": "2026-11-30T01:00:00Z"})
    assert plan_groups.choose(h, plan(consistency="none"), {}) is None
    # a failed run that chose group point 1: the same command resumes at group point 1
    failed = {"operation": "failover", "status": "failed", "options": {"group_point": {"group_seq": 1}}}
    assert plan_groups.choose(h, plan(run=failed), {})["group_seq"] == 1
    # ... an explicit other group point is refused (never silently replaced by the resumed one)
    with pytest.raises(Conflict, match="takes every VM to group point 1 .*group point 3 would leave"):
        plan_groups.choose(h, plan(run=failed), {"group_seq": 3})
    with pytest.raises(Conflict, match="group point 2 would leave"):
        plan_groups.choose(h, plan(run=failed), {"recovery_point": "2026-11-30T02:00:25Z"})
    assert plan_groups.choose(h, plan(run=failed), {"group_seq": 1})["group_seq"] == 1  # the same one: resumes
    assert plan_groups.choose(h, plan(run={**failed, "status": "done"}), {})["group_seq"] == 3
    # a planned failover: every VM prepared, its final point applied — each to its newest
    for vm_id in MEMBERS:
        rel = cat.relationship(vm_id)
        rel.prepared_seq = rel.seq = rel.applied_seq
        await cat.put_relationship(rel)
    assert plan_groups.choose(h, plan(), {}) is None
    assert plan_groups.choose(h, plan(), {"group_seq": 2})["group_seq"] == 2

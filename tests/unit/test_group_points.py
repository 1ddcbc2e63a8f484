"""The replica's commit rule for consistency group points (issue 19 item 3): a group point
exists exactly when every member named in the group's tag has applied its log of that group
sequence — through the applier's own commit, into a real catalog reopened as after a crash.
And the tag itself is untrusted: its header form is checked, and a peer may name only its
own replica VMs in it."""

import json

import pytest

from replicad.auth.authorize import Grant
from replicad.catalog import Catalog
from replicad.errors import Refused, WireError
from replicad.model import VM, Disk, Relationship, ReplicationState
from replicad.replica import group_points
from replicad.replica.admission import Admission
from replicad.replica.applier import Applier
from replicad.wire import DiskInfo, Header

PEER = "vmhost1.contoso.com"
MEMBERS = ["id-db", "id-app", "id-web"]


def header(vm_id: str, seq: int, gseq: int | None, members=MEMBERS, time="2026-11-30T02:00:00Z") -> Header:
    group = {"id": "g1", "seq": gseq, "members": members} if gseq is not None else None
    return Header(vm_id, vm_id.removeprefix("id-"), "e1", seq, seq - 1, "delta", time, "application",
                  (DiskInfo(0, "d.img", 4096),), 3600, history=(8, 1), group=group)


async def replicas(cat: Catalog, tmp_path, ids=MEMBERS, peer=PEER) -> None:
    for vm_id in ids:
        await cat.put_vm(VM(vm_id, vm_id.removeprefix("id-"), disks=[Disk(str(tmp_path / f"{vm_id}.img"))]))
        await cat.put_relationship(Relationship(vm_id, "replica", state=ReplicationState.REPLICATING,
                                                primary_server=peer, trust_group="g", applied_seq=1, seq=9,
                                                last_replication_time="2026-11-30T01:00:00Z",
                                                last_point_time="2026-11-30T01:00:00Z", recovery_history=8))


async def commit(applier: Applier, vm_id: str, seq: int, gseq: int | None, **kw) -> None:
    h = header(vm_id, seq, gseq, **kw)
    await applier.commit(vm_id, h, (["raw"], []), 8)
    group_points.note_applied(applier.catalog, h)


def listed(cat: Catalog, ids=MEMBERS) -> list[int]:
    return [p["group_seq"] for p in group_points.listing(cat, ids)]


async def test_a_group_point_needs_every_members_log_even_across_a_crash(tmp_path):
    path = tmp_path / "catalog.sqlite"
    cat = Catalog(path)
    await replicas(cat, tmp_path)
    applier = Applier(cat, tmp_path, lambda at: None)
    for vm_id in MEMBERS:  # group sequence 1, every member: a group point
        await commit(applier, vm_id, 2, 1)
    assert listed(cat) == [1]
    # group sequence 2: web's log never comes (its cycle failed): no group point of it, and
    # the other two stay ordinary points; group 3 is whole again
    await commit(applier, "id-db", 3, 2, time="2026-11-30T02:00:10Z")
    await commit(applier, "id-app", 3, 2, time="2026-11-30T02:00:10Z")
    assert listed(cat) == [1]
    for vm_id, seq in (("id-db", 4), ("id-app", 4), ("id-web", 3)):
        await commit(applier, vm_id, seq, 3, time="2026-11-30T02:00:20Z")
    assert listed(cat) == [1, 3]
    assert listed(cat, ["id-db", "id-app"]) == [1, 3]  # a plan of two of the members: the same points

    # group sequence 4: two members applied, then the daemon dies before the third's apply
    await commit(applier, "id-db", 5, 4, time="2026-11-30T02:00:30Z")
    await commit(applier, "id-app", 5, 4, time="2026-11-30T02:00:30Z")
    cat.close()
    cat = Catalog(path)  # after the restart: what was durable
    assert listed(cat) == [1, 3]
    applier = Applier(cat, tmp_path, lambda at: None)
    await commit(applier, "id-web", 4, 4, time="2026-11-30T02:00:30Z")
    assert listed(cat) == [1, 3, 4]
    points = group_points.listing(cat, MEMBERS)[-1]["points"]
    assert points == {"id-db": 5, "id-app": 5, "id-web": 4}
    # and a point pruned by a member's retention takes the group point with it
    rel = cat.relationship("id-app")
    rel.points = [p for p in rel.points if (p.get("group") or {}).get("seq") != 1]
    await cat.put_relationship(rel)
    assert listed(cat) == [3, 4]


async def test_a_failed_over_member_keeps_the_others_at_its_group_point(tmp_path):
    cat = Catalog(tmp_path / "catalog.sqlite")
    await replicas(cat, tmp_path)
    applier = Applier(cat, tmp_path, lambda at: None)
    for vm_id in MEMBERS:
        await commit(applier, vm_id, 2, 1)
    rel = cat.relationship("id-db")
    rel.state = ReplicationState.FAILED_OVER  # completed: its points are gone, so is the group's
    await cat.put_relationship(rel)
    assert listed(cat) == []


@pytest.mark.parametrize("group", [
    {"id": "g1", "seq": 1, "members": ["id-db"]},                      # one member is no group
    {"id": "g1", "seq": 1, "members": ["id-app", "id-web"]},           # without the log's own VM
    {"id": "g1", "seq": 0, "members": MEMBERS},
    {"id": "g-1", "seq": 1, "members": MEMBERS},
    {"id": "g1", "seq": True, "members": MEMBERS},
    {"id": "g1", "seq": 1, "members": MEMBERS + ["id-db"]},
    {"id": "g1", "seq": 1, "members": MEMBERS, "extra": 1},
    {"id": "g1", "seq": 1, "members": ["id-db", "../x"]},
    ["g1", 1],
])
def test_a_bad_group_tag_is_refused_with_the_header(group):
    good = header("id-db", 2, 1)
    doc = json.loads(good.to_json())
    doc["group"] = group
    with pytest.raises(WireError, match="consistency group"):
        Header.from_json(json.dumps(doc).encode())
    assert Header.from_json(good.to_json()).group == {"id": "g1", "seq": 1, "members": sorted(MEMBERS)}


def test_a_group_goes_with_a_delta_only():
    h = header("id-db", 2, 1)
    doc = h.to_json().replace(b'"kind":"delta"', b'"kind":"resync"')
    with pytest.raises(WireError, match="consistency group"):
        Header.from_json(doc)


async def test_a_peer_may_name_only_its_own_replica_vms_in_a_group(tmp_path):
    cat = Catalog(tmp_path / "catalog.sqlite")
    await replicas(cat, tmp_path, ["id-db", "id-app"])
    await replicas(cat, tmp_path, ["id-web"], peer="vmhost3.contoso.com")  # another primary's replica
    await cat.put_vm(VM("id-local", "local"))  # one of this host's own VMs
    admission = Admission(cat, tmp_path, lambda vm_id: False)
    grant = Grant(PEER, tmp_path, "g", None)
    group_points.check(admission, grant, header("id-db", 2, 1, members=["id-db", "id-app"]))  # its own: fine
    for other in ("id-web", "id-local", "id-nowhere"):
        with pytest.raises(Refused, match=f"may not name VM {other}"):
            group_points.check(admission, grant, header("id-db", 2, 1, members=["id-db", other]))
    other_group = Grant(PEER, tmp_path, "other", None)
    with pytest.raises(Refused):
        group_points.check(admission, other_group, header("id-db", 2, 1, members=["id-db", "id-app"]))

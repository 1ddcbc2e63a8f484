"""A consistency group one of whose members fails before the captures at every group cycle
(its disk gone, say): the whole group cycle fails each time — and while the group counts as
ready its members run no ticks of their own, so the other members stopped replicating too,
for as long as that one member's fault lasted. After a few failed group cycles in a row the
group pauses (`group.paused`), the members replicate on their own ticks, and group cycles
are tried again later (or at `plan sync`)."""

import os

import pytest

from ..integration.harness import file_digest
from ..integration.images import make_sparse_image, scribble
from .daemons import until
from .test_pair import applied, replica_disk

MiB = 1 << 20


async def grouped_pair(primary, replica, tmp_path) -> dict:
    """db and app replicated every second, in plan shop's consistency group, one group cycle
    done; their images by name."""
    images = {}
    for name in ("db", "app"):
        images[name] = image = tmp_path / f"{name}.img"
        make_sparse_image(image, 4 * MiB, data_pieces=2, seed=len(name))
        await primary.api("POST", "/v1/vms", {"name": name, "disks": [str(image)], "config_file": None,
                                              "allow_backing": []})
        await primary.api("POST", f"/v1/replications/{name}", {"replica_server": replica.fqdn, "auth": "token",
                                                               "replica_port": replica.port, "frequency": 1})
        await primary.api("POST", f"/v1/replications/{name}/start-initial", {"wait": True})
        await applied(primary, replica, name)
    await primary.api("POST", "/v1/plans", {"name": "shop", "vms": [{"vm": "db"}, {"vm": "app"}]})
    await primary.api("PATCH", "/v1/plans/shop", {"consistency": "group"})
    done = await primary.api("POST", "/v1/plans/shop/sync")
    assert sorted(c["vm"] for c in done["cycles"]) == ["app", "db"]
    return images


@pytest.mark.slow  # ~8 s
async def test_one_members_persistent_failure_does_not_stop_the_others(pair, tmp_path):
    primary, replica = pair
    images = await grouped_pair(primary, replica, tmp_path)

    os.unlink(images["app"])  # app's cycles fail before its capture from now on
    scribble(images["db"], 20, seed=5)
    want = file_digest(images["db"])
    copy = await replica_disk(replica, "db")

    async def db_replicated():
        return file_digest(copy) == want
    await until(db_replicated, 20, "db's write replicated while app's cycles fail")
    got = await primary.api("GET", "/v1/plans/shop")
    assert got["group_state"] == "paused" and "failed in a row" in got["group_reason"], got


@pytest.mark.slow  # ~8 s
async def test_a_coordinator_that_fails_unexpectedly_hands_its_vms_back_to_their_own_ticks(pair, tmp_path,
                                                                                           monkeypatch):
    """A fault the coordinator did not foresee (not a ReplicadError) ended its task while its
    VMs still counted as driven by the group: they ran no ticks of their own and stopped
    replicating, silently, until the plan changed or the daemon restarted."""
    from replicad.primary.group_cycle import GroupCycles

    primary, replica = pair
    images = await grouped_pair(primary, replica, tmp_path)

    def broken(self, plan):
        raise RuntimeError("an unforeseen fault in the coordinator")
    monkeypatch.setattr(GroupCycles, "_primary_site", broken)  # its next look at the plan fails
    scribble(images["db"], 20, seed=5)
    want = file_digest(images["db"])
    copy = await replica_disk(replica, "db")

    async def db_replicated():
        return file_digest(copy) == want
    await until(db_replicated, 20, "db's write replicated after the group's coordinator failed")
    got = await primary.api("GET", "/v1/plans/shop")
    assert got["group_state"] == "paused" and "unforeseen fault" in got["group_reason"], got

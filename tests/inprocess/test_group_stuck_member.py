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


@pytest.mark.slow  # ~8 s
async def test_one_members_persistent_failure_does_not_stop_the_others(pair, tmp_path):
    primary, replica = pair
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

    os.unlink(images["app"])  # app's cycles fail before its capture from now on
    scribble(images["db"], 20, seed=5)
    want = file_digest(images["db"])
    copy = await replica_disk(replica, "db")

    async def db_replicated():
        return file_digest(copy) == want
    await until(db_replicated, 20, "db's write replicated while app's cycles fail")
    got = await primary.api("GET", "/v1/plans/shop")
    assert got["group_state"] == "paused" and "failed in a row" in got["group_reason"], got

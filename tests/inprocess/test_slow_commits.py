"""No fsync on the event loop: a catalog commit held in the writer thread (a slow fsync)
leaves the daemon answering — its management API, the replica's applied point — while the
request that made the write waits for it to be durable."""

import asyncio

from replicad.catalog import Catalog

from ..integration.harness import file_digest
from ..integration.images import make_sparse_image, scribble
from .daemons import HeldCommits, until
from .test_pair import applied, enable

MiB = 1 << 20


async def test_a_management_request_is_answered_while_another_ones_commit_is_held(pair, tmp_path):
    primary, _ = pair
    image = tmp_path / "web.img"
    make_sparse_image(image, 1 * MiB, data_pieces=1)
    hold = HeldCommits(primary.host.catalog, lambda sql: any("INTO vms" in s for s in sql))
    add = asyncio.create_task(primary.api("POST", "/v1/vms", {"name": "web", "disks": [str(image)],
                                                              "config_file": None, "allow_backing": []}))
    await until(hold.held.is_set, what="`vm add`'s commit to be held")
    server = await primary.api("GET", "/v1/server")  # answered while the commit waits on its fsync
    assert server["enabled"] is False
    assert [v["name"] for v in await primary.api("GET", "/v1/vms")] == ["web"]  # staged: seen at once
    assert not add.done()  # `vm add` answers only once its row is durable
    hold.release.set()
    assert (await add)["name"] == "web"
    assert Catalog(primary.root / "state" / "catalog.sqlite").vm_by_name("web") is not None


async def test_the_replicas_apply_commit_is_off_the_loop(pair, tmp_path):
    primary, replica = pair
    image = tmp_path / "db.img"
    make_sparse_image(image, 2 * MiB, data_pieces=2)
    await enable(primary, replica, "db", image)
    await primary.api("POST", "/v1/replications/db/start-initial", {"wait": True})
    await applied(primary, replica, "db")

    # the applier's commit writes the VM's row with its relationship: that one is held
    hold = HeldCommits(replica.host.catalog, lambda sql: any("INTO vms" in s for s in sql))
    scribble(image, 5, seed=2)
    delta = await primary.api("POST", "/v1/replications/db/sync", {"wait": True})
    await until(hold.held.is_set, what="the apply's commit to be held")
    got = await replica.api("GET", "/v1/replications/db")  # the replica answers meanwhile
    assert got["applied_sequence"] == delta["seq"]  # the point the applier is committing
    durable = Catalog(replica.root / "state" / "catalog.sqlite")
    assert durable.relationships()[0].applied_seq == delta["seq"] - 1  # not durable yet
    hold.release.set()
    await until(lambda: durable.relationships()[0].applied_seq == delta["seq"], what="the commit to be durable")
    copy = (await replica.api("GET", "/v1/vms/db"))["disks"][0]["path"]
    assert file_digest(copy) == file_digest(image)


async def test_a_peer_is_told_only_what_is_durable(pair, tmp_path):
    """The replica's status answer to a primary (the point it acknowledged and applied, what
    an interrupted cycle is reconciled against) waits for the writes made before it: a
    point still being committed when the replica dies must never have been reported."""
    primary, replica = pair
    image = tmp_path / "db.img"
    make_sparse_image(image, 2 * MiB, data_pieces=2)
    await enable(primary, replica, "db", image)
    await primary.api("POST", "/v1/replications/db/start-initial", {"wait": True})
    await applied(primary, replica, "db")
    vm_id = (await primary.api("GET", "/v1/vms/db"))["id"]
    async with primary.host.client.conversation(replica.fqdn, replica.port, "token") as conv:
        await conv.replica_status(vm_id)  # the session is open before the commit is held
        hold = HeldCommits(replica.host.catalog, lambda sql: any("INTO vms" in s for s in sql))
        scribble(image, 5, seed=2)
        delta = await primary.api("POST", "/v1/replications/db/sync", {"wait": True})
        await until(hold.held.is_set, what="the apply's commit to be held")
        status = asyncio.create_task(conv.replica_status(vm_id))
        durable = Catalog(replica.root / "state" / "catalog.sqlite")
        done, _ = await asyncio.wait({status}, timeout=1.0)  # a bounded look at a negative: no answer yet
        if done:  # whatever it answered must be durable already
            assert status.result()["applied_seq"] == durable.relationships()[0].applied_seq, status.result()
        hold.release.set()
        got = await status
    assert got["applied_seq"] == delta["seq"] == durable.relationships()[0].applied_seq

"""A primary and a replica in the test's process (tests/inprocess/daemons.py): the
replication loop without subprocesses, about a second per test."""

import asyncio
from pathlib import Path

from ..integration.harness import file_digest
from ..integration.images import make_sparse_image, scribble
from .daemons import InProcessHost, until

MiB = 1 << 20


async def enable(primary: InProcessHost, replica: InProcessHost, vm: str, image: Path) -> None:
    await primary.api("POST", "/v1/vms", {"name": vm, "disks": [str(image)], "config_file": None,
                                          "allow_backing": []})
    await primary.api("POST", f"/v1/replications/{vm}", {"replica_server": replica.fqdn,
                                                         "replica_port": replica.port, "auth": "token"})


async def applied(primary: InProcessHost, replica: InProcessHost, vm: str) -> dict:
    seq = (await primary.api("GET", f"/v1/replications/{vm}"))["sequence"]

    async def done():
        d = await replica.api("GET", f"/v1/replications/{vm}")
        return d["applied_sequence"] >= seq and d
    return await until(done, 10, f"{vm} applied up to {seq} on {replica.name}")


async def replica_disk(replica: InProcessHost, vm: str) -> Path:
    doc = await replica.api("GET", f"/v1/vms/{vm}")
    assert doc["replication_mode"] == "Replica", doc
    return Path(doc["disks"][0]["path"])


async def test_initial_copy_then_a_delta(pair, tmp_path):
    primary, replica = pair
    image = tmp_path / "contoso2.img"
    make_sparse_image(image, 8 * MiB, data_pieces=4)
    await enable(primary, replica, "contoso2", image)
    assert (await primary.api("GET", "/v1/replications/contoso2"))["state"] == "ReadyForInitialReplication"

    first = await primary.api("POST", "/v1/replications/contoso2/start-initial", {"wait": True})
    assert first["kind"] == "initial" and first["seq"] == 1
    await applied(primary, replica, "contoso2")
    copy = await replica_disk(replica, "contoso2")
    assert file_digest(copy) == file_digest(image)

    scribble(image, 20, seed=3)
    delta = await primary.api("POST", "/v1/replications/contoso2/sync", {"wait": True})
    assert delta["kind"] == "delta" and delta["seq"] == 2
    assert delta["data_bytes"] <= 20 * 64 * 1024  # only the changed blocks
    got = await applied(primary, replica, "contoso2")
    assert got["state"] == "Replicating"
    assert file_digest(copy) == file_digest(image)


async def test_test_failover_starts_and_stops(pair, tmp_path):
    primary, replica = pair
    image = tmp_path / "web.img"
    make_sparse_image(image, 4 * MiB, data_pieces=2)
    await enable(primary, replica, "web", image)
    await primary.api("POST", "/v1/replications/web/start-initial", {"wait": True})
    await applied(primary, replica, "web")

    test = await replica.api("POST", "/v1/failover/web/start", {"as_test": True})
    test_disk = Path(test["disks"][0]["path"])
    assert file_digest(test_disk) == file_digest(image)
    assert (await replica.api("GET", "/v1/replications/web"))["state"] == "Replicating"  # replication goes on

    stopped = await replica.api("POST", "/v1/failover/web/stop")
    assert stopped["removed"] == test["name"]
    assert not await asyncio.to_thread(test_disk.exists)
    assert [v["name"] for v in await replica.api("GET", "/v1/vms")] == ["web"]


async def test_stop_and_start_again_resumes(pair, tmp_path):
    """A daemon stopped (as by SIGTERM) and started again on the same state dir resumes."""
    primary, replica = pair
    image = tmp_path / "db.img"
    make_sparse_image(image, 4 * MiB, data_pieces=2)
    await enable(primary, replica, "db", image)
    await primary.api("POST", "/v1/replications/db/start-initial", {"wait": True})
    await applied(primary, replica, "db")

    assert await replica.stop() == 0
    await replica.start()
    scribble(image, 5, seed=9)
    delta = await primary.api("POST", "/v1/replications/db/sync", {"wait": True})
    assert delta["kind"] == "delta"
    await applied(primary, replica, "db")
    assert file_digest(await replica_disk(replica, "db")) == file_digest(image)

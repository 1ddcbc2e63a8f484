"""An operator's verb taken while a cycle is in flight is what the relationship shows after
the cycle ends (docs/design.md §5, "A verb during a cycle"): the cycle's outcome is recorded
— its error — but the state stays what the verb set. The cycle is held at a known point:
the replica's commit of the log it receives (its acknowledgement waits for that commit);
the cycle then fails just after the acknowledgement (a fault hook: a permanent error)."""

import asyncio

import pytest

from replicad.errors import ReplicadError

from ..integration.images import make_sparse_image, scribble
from .daemons import ApiFailed, HeldCommits, until
from .test_pair import applied, enable

MiB = 1 << 20


@pytest.mark.parametrize("cycle", ["initial", "delta"])
async def test_a_verb_taken_while_a_cycle_is_in_flight_is_not_overwritten_by_its_outcome(pair, tmp_path, cycle):
    primary, replica = pair
    image = tmp_path / "web.img"
    make_sparse_image(image, 2 * MiB, data_pieces=2)
    await enable(primary, replica, "web", image)
    if cycle == "delta":
        await primary.api("POST", "/v1/replications/web/start-initial", {"wait": True})
        await applied(primary, replica, "web")
        scribble(image, 5, seed=4)

    def fault(at: str) -> None:
        if at == "primary-after-ack":
            raise ReplicadError("the disk went away after the acknowledgement")
    primary.host.primary._fault = fault
    hold = HeldCommits(replica.host.catalog, lambda sql: any("INTO relationships" in s for s in sql))
    verb = "start-initial" if cycle == "initial" else "sync"
    run = asyncio.create_task(primary.api("POST", f"/v1/replications/web/{verb}", {"wait": True}))
    await until(hold.held.is_set, what="the replica's commit of the log to be held")

    assert (await primary.api("POST", "/v1/replications/web/suspend"))["state"] == "Suspended"
    expected = "Suspended"
    if cycle == "initial":  # suspended and resumed while the initial copy ran: nothing acknowledged yet
        expected = (await primary.api("POST", "/v1/replications/web/resume"))["state"]
        assert expected == "ReadyForInitialReplication"
    hold.release.set()
    with pytest.raises(ApiFailed, match="the disk went away"):
        await run

    after = await primary.api("GET", "/v1/replications/web")
    assert after["state"] == expected  # not Error: the verb wins
    assert "the disk went away" in after["error"]  # the cycle's outcome is recorded all the same


async def test_a_suspend_before_a_retried_initial_copy_records_its_start_is_kept(pair, tmp_path):
    """A retried initial copy asks the replica where the earlier attempt got to before it
    records its start: a `suspend` taken while it asks is not overwritten by that start."""
    primary, replica = pair
    image = tmp_path / "db.img"
    make_sparse_image(image, 2 * MiB, data_pieces=2)
    await enable(primary, replica, "db", image)
    engine = primary.host.primary
    failures = ["once"]

    def fault(at: str) -> None:
        if at == "primary-after-ack" and failures:
            failures.pop()
            raise ReplicadError("the first attempt failed after the acknowledgement")
    engine._fault = fault
    with pytest.raises(ApiFailed, match="the first attempt failed"):
        await primary.api("POST", "/v1/replications/db/start-initial", {"wait": True})

    asked, answer = asyncio.Event(), asyncio.Event()
    resume_point = engine._resume_point

    async def held(rel, conv):  # the retry's question to the replica, held until the verb is taken
        asked.set()
        await answer.wait()
        return await resume_point(rel, conv)
    engine._resume_point = held
    await primary.api("POST", "/v1/replications/db/start-initial", {})
    await asyncio.wait_for(asked.wait(), 10)
    assert (await primary.api("POST", "/v1/replications/db/suspend"))["state"] == "Suspended"
    answer.set()

    async def acknowledged():
        d = await primary.api("GET", "/v1/replications/db")
        return d["sequence"] == 1 and d
    after = await until(acknowledged, what="the retried initial copy to be acknowledged")
    assert after["state"] == "Suspended"  # the cycle's start did not write its state over the verb's



@pytest.mark.parametrize("delta", ["acknowledged", "failed"])
async def test_a_resync_asked_while_a_delta_is_in_flight_runs_after_it(pair, tmp_path, delta):
    """`replication resync` taken while a delta cycle is in flight: the delta's outcome
    (its acknowledgement, or a permanent error after it) does not turn the relationship
    back to Replicating or Error and lose the resync; the next cycle is the resync (its
    waiter gets a resync's outcome)."""
    primary, replica = pair
    image = tmp_path / "app.img"
    make_sparse_image(image, 2 * MiB, data_pieces=2)
    await enable(primary, replica, "app", image)
    await primary.api("POST", "/v1/replications/app/start-initial", {"wait": True})
    await applied(primary, replica, "app")
    scribble(image, 5, seed=6)
    faults = ["once"] if delta == "failed" else []

    def fault(at: str) -> None:
        if at == "primary-after-ack" and faults:
            faults.pop()
            raise ReplicadError("the disk went away after the acknowledgement")
    primary.host.primary._fault = fault
    hold = HeldCommits(replica.host.catalog, lambda sql: any("INTO relationships" in s for s in sql))
    sync = asyncio.create_task(primary.api("POST", "/v1/replications/app/sync", {"wait": True}))
    await until(hold.held.is_set, what="the replica's commit of the delta to be held")
    resync = asyncio.create_task(primary.api("POST", "/v1/replications/app/resync", {"wait": True}))

    async def resync_taken():
        return (await primary.api("GET", "/v1/replications/app"))["state"] == "Resynchronizing"
    await until(resync_taken, what="the resync verb to be taken")
    hold.release.set()
    if delta == "failed":
        with pytest.raises(ApiFailed, match="the disk went away"):
            await sync
    else:
        assert (await sync)["kind"] == "delta"
    assert (await resync)["kind"] == "resync"  # not lost when the delta ended
    after = await primary.api("GET", "/v1/replications/app")
    assert after["state"] == "Replicating" and after["error"] is None

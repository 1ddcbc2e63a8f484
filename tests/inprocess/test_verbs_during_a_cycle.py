"""An operator's verb taken while a cycle is in flight is what the relationship shows after
the cycle ends (docs/design.md §5, "A verb during a cycle"): the cycle's outcome is recorded
— its error — but the state stays what the verb set. The cycle is held at a known point:
the replica's commit of the log it receives (its acknowledgement waits for that commit);
the cycle then fails just after the acknowledgement (a fault hook: a permanent error)."""

import asyncio
import contextlib
import shutil

import pytest

from replicad.errors import ReplicadError
from replicad.replication_states import CycleKind

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


async def a_failed_initial_copy_whose_retry_is_held(primary, vm: str) -> tuple[asyncio.Event, asyncio.Event]:
    """An initial copy of ``vm`` that fails after the replica acknowledged it; the next
    attempt's question to the replica (where the earlier attempt got to: planned, its start
    not yet recorded) sets the first event returned and waits for the second."""
    engine = primary.host.primary
    failures = ["once"]

    def fault(at: str) -> None:
        if at == "primary-after-ack" and failures:
            failures.pop()
            raise ReplicadError("the first attempt failed after the acknowledgement")
    engine._fault = fault
    with pytest.raises(ApiFailed, match="the first attempt failed"):
        await primary.api("POST", f"/v1/replications/{vm}/start-initial", {"wait": True})
    asked, answer = asyncio.Event(), asyncio.Event()
    resume_point = engine.resume_point

    async def held(rel, conv):  # the retry's question to the replica, held until the verb is taken
        asked.set()
        await answer.wait()
        return await resume_point(rel, conv)
    engine.resume_point = held
    return asked, answer


async def test_a_suspend_before_a_retried_initial_copy_records_its_start_is_kept(pair, tmp_path):
    """A retried initial copy asks the replica where the earlier attempt got to before it
    records its start: a `suspend` taken while it asks is not overwritten by that start."""
    primary, replica = pair
    image = tmp_path / "db.img"
    make_sparse_image(image, 2 * MiB, data_pieces=2)
    await enable(primary, replica, "db", image)
    asked, answer = await a_failed_initial_copy_whose_retry_is_held(primary, "db")
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


@pytest.mark.parametrize("running", ["automatic", "operator's"])
async def test_a_resync_asked_while_a_resync_is_in_flight_gets_its_own_resync(pair, tmp_path, running):
    """`replication resync --wait` taken while a resync is in flight (the engine's own after a
    lost baseline — seen once under load: the supervisor's retry started just before the
    operator's command — or an earlier `resync`): that resync started before the verb, so
    the verb's waiter is not its; when it ends, the relationship is still Resynchronizing
    and the next cycle is the verb's resync. Never a delta (the verb's waiter was resolved
    by the delta that followed the running resync, `kind: delta`)."""
    primary, replica = pair
    image = tmp_path / "r.img"
    make_sparse_image(image, 2 * MiB, data_pieces=2)
    await enable(primary, replica, "r", image)
    await primary.api("POST", "/v1/replications/r/start-initial", {"wait": True})
    await applied(primary, replica, "r")
    vm_id = (await primary.api("GET", "/v1/vms/r"))["id"]
    engine = primary.host.primary
    hold = HeldCommits(replica.host.catalog, lambda sql: any("INTO relationships" in s for s in sql))
    scribble(image, 5, seed=11)
    earlier = None
    if running == "automatic":
        shutil.rmtree(primary.host.config.state_dir / "maps" / vm_id)  # the primary lost its digest maps
        with pytest.raises(ApiFailed, match="digest maps of acknowledged cycle 1 are missing"):
            await primary.api("POST", "/v1/replications/r/sync", {"wait": True})
        # the supervisor's retry, after its backoff, is the engine's own resync
    else:
        earlier = asyncio.create_task(primary.api("POST", "/v1/replications/r/resync", {"wait": True}))
    await until(hold.held.is_set, what="the replica's commit of the running resync to be held")
    assert engine._planned.get(vm_id) == CycleKind.RESYNC
    resync = asyncio.create_task(primary.api("POST", "/v1/replications/r/resync", {"wait": True}))
    await until(lambda: resync.done() or engine._waiters.get(vm_id), what="the verb's waiter")
    hold.release.set()
    if earlier is not None:
        assert (await earlier)["kind"] == "resync"
    got = await resync
    assert got["kind"] == "resync", got  # the verb's own resync, not the delta after the running one
    assert got["seq"] == 3  # the running resync was cycle 2
    after = await primary.api("GET", "/v1/replications/r")
    assert (after["state"], after["error"]) == ("Replicating", None)


class GatedClient:
    """The primary's peer client with its next conversation held before it connects (the
    cycle has started, nothing is planned yet); ``fail``: that conversation fails instead."""

    def __init__(self, inner, fail: Exception | None = None):
        self._inner, self._fail = inner, fail
        self.entered, self.go, self._used = asyncio.Event(), asyncio.Event(), False

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    @contextlib.asynccontextmanager
    async def conversation(self, *args):
        if not self._used:
            self._used = True
            self.entered.set()
            await self.go.wait()
            if self._fail is not None:
                raise self._fail
        async with self._inner.conversation(*args) as conv:
            yield conv


@pytest.mark.parametrize("connect", ["connects", "fails"])
async def test_a_resync_asked_while_a_cycle_connects_is_the_resync_that_cycle_or_the_next_runs(pair, tmp_path,
                                                                                                 connect):
    """`replication resync --wait` taken after a cycle started (the supervisor's tick, a
    `sync`) but before it was planned: the cycle plans from the verb's state, so it is the
    verb's resync and takes its waiter; when it fails before it is planned (a permanent
    error connecting), the relationship stays Resynchronizing and the next cycle is the
    resync. The waiter was left for the delta after, with `kind: delta`."""
    primary, replica = pair
    image = tmp_path / "c.img"
    make_sparse_image(image, 2 * MiB, data_pieces=2)
    await enable(primary, replica, "c", image)
    await primary.api("POST", "/v1/replications/c/start-initial", {"wait": True})
    await applied(primary, replica, "c")
    engine = primary.host.primary
    gate = GatedClient(engine.client, ReplicadError("the replica refused the session") if connect == "fails" else None)
    engine.client = gate
    scribble(image, 3, seed=12)
    await primary.api("POST", "/v1/replications/c/sync", {})  # a cycle starts, held before it connects
    await asyncio.wait_for(gate.entered.wait(), 10)
    resync = asyncio.create_task(primary.api("POST", "/v1/replications/c/resync", {"wait": True}))

    async def taken():
        return (await primary.api("GET", "/v1/replications/c"))["state"] == "Resynchronizing"
    await until(taken, what="the resync verb to be taken")
    gate.go.set()
    got = await resync
    assert (got["kind"], got["seq"]) == ("resync", 2), got
    after = await primary.api("GET", "/v1/replications/c")
    assert (after["state"], after["error"]) == ("Replicating", None)


async def test_a_start_initial_wait_taken_while_a_retried_initial_copy_asks_the_replica_is_that_copy(pair, tmp_path):
    """`start-initial --wait` taken while the supervisor's retry of a failed initial copy asks
    the replica where the earlier attempt got to (planned, its start not yet recorded): that
    copy is the one the verb starts, and its waiter gets it — not the delta after it."""
    primary, replica = pair
    image = tmp_path / "i.img"
    make_sparse_image(image, 2 * MiB, data_pieces=2)
    await enable(primary, replica, "i", image)
    vm_id = (await primary.api("GET", "/v1/vms/i"))["id"]
    engine = primary.host.primary
    asked, answer = await a_failed_initial_copy_whose_retry_is_held(primary, "i")
    assert (await primary.api("GET", "/v1/replications/i"))["state"] == "Error"
    await asyncio.wait_for(asked.wait(), 10)  # the supervisor's own retry, after its backoff
    run = asyncio.create_task(primary.api("POST", "/v1/replications/i/start-initial", {"wait": True}))
    await until(lambda: run.done() or engine._waiters.get(vm_id), what="the verb's waiter")
    answer.set()
    got = await run
    assert (got["kind"], got["seq"]) == ("initial", 1), got

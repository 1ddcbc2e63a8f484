"""A cycle cancelled while its pre-snapshot hook runs (the daemon stopping, `plan set
--consistency none` during a group cycle: the awaiting task is cancelled, the hook's thread
runs on): the engine's ``finally`` asks for the thaw at once. The post-snapshot hook must
run after the pre-snapshot one has ended — run beside it, the freeze lands after the thaw
and the application stays frozen with no cycle left to thaw it."""

import asyncio

from tests.inprocess.daemons import until
from tests.unit.test_producer_tracker import FakeTracker, make, views

from replicad.primary.producer import CycleProducer


def hooked(tmp_path) -> tuple[CycleProducer, list[str], object]:
    log, go = tmp_path / "hooks.log", tmp_path / "go"
    p = make(FakeTracker(views([])))
    p.vm.hooks = {"pre_snapshot": f"echo pre-start >> {log}; while [ ! -e {go} ]; do sleep 0.02; done; "
                                  f"echo pre-end >> {log}",
                  "post_snapshot": f"echo post >> {log}"}
    return p, log, go


async def test_a_thaw_asked_while_the_pre_snapshot_hook_runs_follows_it(tmp_path):
    p, log, go = hooked(tmp_path)
    freezing = asyncio.ensure_future(asyncio.to_thread(p.freeze))
    await until(lambda: log.exists() and "pre-start" in log.read_text(), 10, "the pre-snapshot hook")
    await asyncio.to_thread(p.thaw)  # the cancelled cycle's finally
    go.touch()
    await freezing
    assert log.read_text().split() == ["pre-start", "pre-end", "post"]
    await asyncio.to_thread(p.thaw)  # once only
    assert log.read_text().split() == ["pre-start", "pre-end", "post"]


async def test_a_thaw_after_the_freeze_runs_the_post_hook_once(tmp_path):
    p, log, go = hooked(tmp_path)
    go.touch()
    await asyncio.to_thread(p.freeze)
    await asyncio.to_thread(p.thaw)
    await asyncio.to_thread(p.thaw)
    assert log.read_text().split() == ["pre-start", "pre-end", "post"]

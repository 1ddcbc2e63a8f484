"""Thread pools per purpose (workers.py): one purpose saturated never delays another."""

import asyncio
import contextvars
import threading

from replicad import workers

PEER = contextvars.ContextVar("peer", default=None)


async def test_a_saturated_receive_pool_starves_no_other_purpose():
    gate = threading.Event()
    blocked = [asyncio.ensure_future(workers.RECEIVE.run(gate.wait)) for _ in range(workers.RECEIVE.size)]
    try:
        # every receive thread is taken (a peer trickling its logs, say): applying, digests
        # and the primary's own cycles still run at once, each in a thread of its own pool
        for pool in (workers.APPLY, workers.DIGESTS, workers.SEND):
            name = await asyncio.wait_for(pool.run(lambda: threading.current_thread().name), 5)
            assert name.startswith(f"replicad-{pool.name}")
        # and receiving is bounded: one more waits for a receive thread
        late = asyncio.ensure_future(workers.RECEIVE.run(lambda: "late"))
        done, _ = await asyncio.wait([late], timeout=0.5)
        assert not done
    finally:
        gate.set()
    assert await asyncio.wait_for(late, 5) == "late"
    await asyncio.gather(*blocked)


async def test_work_runs_with_the_callers_context():
    PEER.set("vmhost2.contoso.com")  # structlog's bound fields travel this way
    assert await workers.APPLY.run(PEER.get) == "vmhost2.contoso.com"

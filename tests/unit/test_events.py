"""The events ring: replay of the last lines, followers fed as lines happen, and a follower
that falls behind told how many lines it missed (the daemon never waits for it)."""

import asyncio

from replicad import events


async def test_a_slow_follower_is_told_what_it_missed(monkeypatch):
    monkeypatch.setattr(events, "FOLLOWER_QUEUE", 4)
    bus = events.EventBus()
    bus.attach(asyncio.get_running_loop())
    q = bus.follow()
    for i in range(10):  # nobody reads: the queue fills, the rest is counted
        bus.processor(None, "info", {"event": "cycle.done", "vm": "a", "cycle": i})
    bus.processor(None, "info", {"event": "daemon.stopped"})  # not watched: neither kept nor sent
    got = [q.get_nowait() for _ in range(q.qsize())]
    assert [e["cycle"] for e in got] == [0, 1, 2]
    bus.processor(None, "info", {"event": "cycle.done", "vm": "a", "cycle": 10})
    gap, nxt = q.get_nowait(), q.get_nowait()
    assert gap == {"event": "events.dropped", "count": 7,
                   "reason": "this follower fell behind; the daemon's log has every line"}
    assert nxt["cycle"] == 10
    assert [e["cycle"] for e in bus.recent] == list(range(11))  # the ring keeps them all


async def test_lines_from_a_worker_thread_reach_followers_through_the_loop():
    bus = events.EventBus()
    bus.attach(asyncio.get_running_loop())
    q = bus.follow()
    await asyncio.to_thread(bus.processor, None, "info", {"event": "health.changed", "vm": "b"})
    assert (await asyncio.wait_for(q.get(), 5))["vm"] == "b"
    bus.unfollow(q)
    bus.processor(None, "info", {"event": "health.changed", "vm": "c"})
    assert q.empty()

"""State changes for terminals: `replicad events [--follow]` (issue 7).

The daemon's log already says everything, one JSON line per decision; this keeps the lines
an operator watches (cycles, failures, health and state changes, failovers) in a ring of the
last 500 and hands them to followers as they happen. It is fed by a structlog processor, so
there is one place where events are named: the log call. Followers are asyncio queues on the
daemon's loop; a line logged from a worker thread reaches them through the loop."""

from __future__ import annotations

import asyncio
import collections
import threading
from typing import Any

from structlog.typing import EventDict

WATCHED_PREFIXES = ("cycle.", "health.", "replication.", "failover.", "resync.", "relationship.", "state.",
                    "initial.", "verify.", "daemon.ready", "daemon.stopping", "log.applied", "log.rejected",
                    "vm.added", "vm.removed", "baseline.promoted", "plan.", "hook.output",
                    "group.")
KEEP = 500
FOLLOWER_QUEUE = 1000  # a follower this far behind loses lines (and is told how many); the daemon never waits
END = {"event": "events.end", "reason": "the daemon is stopping"}  # the last thing a follower gets


class EventBus:
    def __init__(self) -> None:
        self.recent: collections.deque[dict] = collections.deque(maxlen=KEEP)
        self._followers: set[asyncio.Queue] = set()
        self._dropped: dict[asyncio.Queue, int] = {}  # lines a slow follower missed, said when it catches up
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self.closed = False

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def publish(self, event: dict) -> None:
        with self._lock:
            self.recent.append(event)
        loop = self._loop
        if loop is None or not self._followers:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._deliver(event)
        elif not loop.is_closed():
            loop.call_soon_threadsafe(self._deliver, event)

    def _deliver(self, event: dict) -> None:
        for q in list(self._followers):
            if q.qsize() >= q.maxsize - 1:  # keep a slot for the gap notice
                self._dropped[q] = self._dropped.get(q, 0) + 1
                continue
            missed = self._dropped.pop(q, 0)
            if missed:
                q.put_nowait({"event": "events.dropped", "count": missed,
                              "reason": "this follower fell behind; the daemon's log has every line"})
            q.put_nowait(event)

    def follow(self) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue(FOLLOWER_QUEUE)
        if self.closed:
            q.put_nowait(END)
        else:
            self._followers.add(q)
        return q

    def close(self) -> None:
        """The daemon is stopping: every follower gets ``END`` after what it has queued, so
        its stream ends now instead of holding the stop for the whole drain. Runs on the loop."""
        self.closed = True
        for q in list(self._followers):
            if q.full():
                q.get_nowait()  # a follower this far behind loses one more line, not the end
            q.put_nowait(END)
        self._followers.clear()

    def unfollow(self, q: asyncio.Queue) -> None:
        self._followers.discard(q)
        self._dropped.pop(q, None)

    def processor(self, logger: Any, method_name: str, event_dict: EventDict) -> EventDict:
        """structlog processor: copy a watched event (after the timestamp is added)."""
        name = event_dict.get("event", "")
        if isinstance(name, str) and name.startswith(WATCHED_PREFIXES):
            self.publish({k: v for k, v in event_dict.items() if k != "exc_info"})
        return event_dict


bus = EventBus()  # one per process: the daemon's

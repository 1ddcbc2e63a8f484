"""systemd's notify protocol (sd_notify(3)), spoken directly: one datagram per message to
``$NOTIFY_SOCKET``. Without that variable (not started by systemd) every call does nothing.

The daemon says READY=1 once recovery is done and it listens, RELOADING=1 then READY=1
around a SIGHUP reload, STOPPING=1 when it starts draining, and, when the unit sets
``WatchdogSec=``, WATCHDOG=1 from the event loop itself: a loop that is stuck (or lags by
more than half the watchdog period) stops the pings, and systemd restarts the service."""

from __future__ import annotations

import asyncio
import os
import socket
import time

from . import log as logmod

log = logmod.get("notify")


class Notifier:
    def __init__(self, environ: dict | None = None):
        env = os.environ if environ is None else environ
        addr = env.pop("NOTIFY_SOCKET", "")  # hooks and other children must not inherit it
        self._addr = "\0" + addr[1:] if addr.startswith("@") else addr
        usec = env.pop("WATCHDOG_USEC", "")
        pid = env.pop("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        self.watchdog_seconds = int(usec) / 1e6 if usec.isdigit() and int(usec) > 0 and mine else 0.0
        self._warned = False

    @property
    def enabled(self) -> bool:
        return bool(self._addr)

    def send(self, *fields: str) -> bool:
        if not self._addr:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK) as s:
                s.sendto("\n".join(fields).encode(), self._addr)  # never blocks the loop
            return True
        except OSError as e:
            if not self._warned:  # once: a broken socket must not flood the log
                self._warned = True
                log.warning("notify.failed", socket=self._addr.replace("\0", "@"), reason=e.strerror or str(e))
            return False

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def reloading(self) -> None:
        self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=draining")

    async def watchdog(self) -> None:
        """Ping at half the period while the loop keeps time; runs until cancelled."""
        if not self.watchdog_seconds:
            return
        period = self.watchdog_seconds / 2
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + period
            await asyncio.sleep(period)
            lag = loop.time() - due
            if lag < period:
                self.send("WATCHDOG=1")
            else:
                log.error("notify.watchdog_skipped", lag=round(lag, 3),
                          reason="the event loop is lagging; systemd will restart the service if it goes on")

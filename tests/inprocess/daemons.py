"""Daemons in the test's own process: the real ``Daemon`` class run in the test's event
loop (pytest-asyncio), on real sockets (127.0.0.x, free ports), with real files and a temp
state dir each. Engine and replica behaviour can be tested in about a second, with no
subprocess, no CLI and no start-up of an interpreter; ``tests/integration/`` (real daemons
as processes, driven by the real CLI) stays the end-to-end proof.

    async with InProcessCluster(tmp_path) as c:
        primary, replica = await c.pair()
        await primary.api("POST", "/v1/vms", {...})

A host's ``daemon`` and ``daemon.host`` (catalog, primary engine, replica service) are
there to look at or to wrap (a fault injected in one of its parts). The daemons share the
process's worker pools and its event bus (the fixture gives each test a fresh one)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

from replicad import config as configmod
from replicad.auth.token import realm_init, realm_issue
from replicad.catalog import Catalog
from replicad.daemon import Daemon
from replicad.host import Host

from ..integration.harness import free_port

DOMAIN = "contoso.com"
T = TypeVar("T")


async def until(cond: Callable[[], Awaitable[T] | T], within: float = 10.0, what: str = "condition") -> T:
    """Wait until ``cond()`` (a function or a coroutine function) returns a truthy value,
    checking at each turn of the loop's timer; fail with ``what`` after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        v = cond()
        if asyncio.iscoroutine(v):
            v = await v
        if v:
            return v  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.01)


class HeldCommits:
    """The catalog's writer connection with the COMMIT of chosen transactions held, as a
    commit whose fsync takes as long as the test wants: ``held`` is set when one waits,
    ``release`` lets it go (after ``limit`` seconds anyway, so a loop it blocks comes back
    and the test fails instead of hanging). ``when`` picks the transactions by their SQL."""

    def __init__(self, catalog: Catalog, when: Callable[[list[str]], bool], limit: float = 5.0):
        self._db, self._when, self._limit = catalog._db, when, limit
        self.held, self.release = threading.Event(), threading.Event()
        self._statements: list[str] = []
        catalog._db = self  # type: ignore[assignment]

    def execute(self, sql: str, *args):
        if sql == "BEGIN":
            self._statements = []
        elif sql == "COMMIT" and self._when(self._statements):
            self.held.set()
            self.release.wait(self._limit)
        else:
            self._statements.append(sql)
        return self._db.execute(sql, *args)

    def __getattr__(self, name: str):
        return getattr(self._db, name)


class ApiFailed(Exception):
    def __init__(self, status: int, doc: Any):
        super().__init__(f"HTTP {status}: {doc}")
        self.status, self.doc = status, doc


class InProcessHost:
    def __init__(self, cluster: InProcessCluster, name: str, addr: str):
        self.cluster, self.name, self.addr = cluster, name, addr
        self.root = cluster.root / name
        self.root.mkdir(parents=True)
        self.port = free_port(addr)
        realm_issue(cluster.root / "realm", self.fqdn, self.root / f"{self.fqdn}.cred")
        self.daemon: Daemon | None = None
        self.task: asyncio.Task | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def fqdn(self) -> str:
        return f"{self.name}.{DOMAIN}"

    @property
    def socket(self) -> Path:
        return self.root / "state" / "replicad.sock"

    @property
    def host(self) -> Host:
        assert self.daemon is not None and self.daemon.host is not None, f"{self.name} is not started"
        return self.daemon.host

    def config(self) -> configmod.Config:
        doc = {"host": self.fqdn, "state_dir": "state",
               "listen": {"token": {"address": self.addr, "port": self.port}},
               "realm": {"credential": f"{self.fqdn}.cred", "public_key": "../realm/realm.pub"},
               "management": {"socket": "state/replicad.sock", "admins": [f"mgmt.{DOMAIN}"]},
               "resolve": {h.fqdn: h.addr for h in self.cluster.hosts.values()}}
        return configmod.parse(doc, base=self.root)

    async def start(self) -> None:
        """Run the daemon in this loop until it is ready (or fail with why it stopped)."""
        self.daemon = Daemon(self.config())
        self.task = asyncio.create_task(self.daemon.run(signals=False), name=f"daemon:{self.name}")
        ready = asyncio.create_task(self.daemon.ready.wait())
        await asyncio.wait({ready, self.task}, timeout=15, return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            ready.cancel()
            if self.task.done():
                self.task.result()  # raises what stopped it
            raise AssertionError(f"{self.name} not ready within 15 s")

    async def stop(self) -> int:
        """What SIGTERM does: shutdown, then the daemon's exit code."""
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self.task is None or self.daemon is None:
            return 0
        self.daemon.stop()
        task, self.task = self.task, None
        return await task

    async def api(self, method: str, path: str, body: dict | None = None) -> Any:
        """One management API call over the unix socket, as the CLI makes it; the result of
        an NDJSON operation (``"wait": true``) is its ``result`` line."""
        if self._session is None:
            self._session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(self.socket)))
        async with self._session.request(method, "http://localhost" + path, json=body) as r:
            raw = await r.read()
            if r.status >= 400:
                raise ApiFailed(r.status, json.loads(raw) if raw else None)
            if not r.headers.get("content-type", "").startswith("application/x-ndjson"):
                return json.loads(raw) if raw else None
        for line in raw.splitlines():
            doc = json.loads(line) if line.strip() else {}
            if "error" in doc:
                raise ApiFailed(r.status, doc)
            if "result" in doc:
                return doc["result"]
        raise AssertionError(f"{method} {path}: no result in {raw[-300:]!r}")


class InProcessCluster:
    """Hosts of one token realm (the article's names on 127.0.0.x); every daemon started
    is stopped on exit."""

    def __init__(self, root: Path):
        self.root = root
        self.hosts: dict[str, InProcessHost] = {}
        realm_init(DOMAIN, root / "realm")

    def add(self, name: str) -> InProcessHost:
        h = InProcessHost(self, name, f"127.0.0.{len(self.hosts) + 1}")
        self.hosts[name] = h
        return h

    async def pair(self) -> tuple[InProcessHost, InProcessHost]:
        """vmhost2 (primary) replicating to vmhost1 (replica, accepting *.contoso.com in
        trust group Production), as the article sets them up; both started."""
        replica, primary = self.add("vmhost1"), self.add("vmhost2")
        await replica.start()
        await primary.start()
        await replica.api("PATCH", "/v1/server", {"enabled": True, "auth": "token", "allow_any_server": False})
        await replica.api("POST", "/v1/auth-entries", {"primary": f"*.{DOMAIN}", "storage": None,
                                                       "trust_group": "Production"})
        return primary, replica

    async def __aenter__(self) -> InProcessCluster:
        return self

    async def __aexit__(self, *exc) -> None:
        results = [await asyncio.gather(h.stop(), return_exceptions=True) for h in self.hosts.values()]
        for (r,) in results:  # every host stopped, then the first failure told
            if isinstance(r, BaseException):
                raise r

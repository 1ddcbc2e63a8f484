"""The daemon: the one place where config becomes objects; lifecycle and signals.

``Daemon.run`` is three named steps. Startup: build (state-dir lock, catalog, the host's
parts) → recover (interrupted failover steps, replica copies) → listen (management socket,
peer and metrics listeners) → supervise (one task per primary relationship) → ready.
Serve until SIGTERM/SIGINT. Shutdown: stop accepting (every listening socket closed: a new
connection is refused) → cancel the supervisors and appliers (a half-sent log is dropped by
the replica and sent again) → drain the open connections within the timeout → close the
catalog, the socket and the lock; exit 0."""

from __future__ import annotations

import asyncio
import functools
import os
import signal
from typing import Any

from aiohttp import web

from . import __version__, events, metrics, reverse, split_brain
from . import log as logmod
from .api.app import create_app
from .auth import kerberos as krb
from .auth.session import SessionStore
from .auth.tls import TlsMaterial
from .auth.token import Credential, RealmPublic
from .catalog import Catalog
from .config import Config
from .errors import ConfigError
from .host import Host
from .notify import Notifier
from .ownership import ManagementSocket, StateDirLock
from .primary.engine import PrimaryEngine
from .replica.failovers import Failovers
from .replica.service import ReplicaService
from .times import TEST_CLOCK_OFFSET
from .transport.client import PeerClient
from .transport.listen import CappedSite, ConnectionLimits, fit_limits, raise_descriptor_limit
from .transport.server import PeerContext, create_peer_app

log = logmod.get("replicad.daemon")
DRAIN_TIMEOUT = 5.0


def fault_hook():
    """Test-only crash points for the fault suite: REPLICAD_FAULT=<phase> makes the process
    die (os._exit) at that phase. Read from the environment at start, never from the network."""
    phase = os.environ.get("REPLICAD_FAULT", "")

    def fault(at: str) -> None:
        if phase and at == phase:
            log.warning("fault.injected", phase=at)
            os._exit(99)
    return fault


class Daemon:
    def __init__(self, config: Config):
        self.config = config
        self._stop = asyncio.Event()
        self._runners: list[web.AppRunner] = []
        self.notifier = Notifier()
        self._lock = StateDirLock(config.state_dir)
        self._socket = ManagementSocket(config.management.socket)
        self._socket_runner: web.AppRunner | None = None
        self._socket_site: web.UnixSite | None = None
        self._restoring: asyncio.Task | None = None
        self.host: Host | None = None  # built by run()
        self.ready = asyncio.Event()  # set once startup is done: recovered, listening, supervising

    def _build(self) -> Host:
        cfg = self.config
        cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock.acquire()  # before anything in the state dir is read or written
        credential = realm = None
        if cfg.realm is not None:
            credential = Credential.load(cfg.realm.credential)
            realm = RealmPublic.load(cfg.realm.public_key)
            if credential.host != cfg.host:
                raise ConfigError(f"realm.credential: issued to {credential.host}, but host is {cfg.host}")
            if credential.realm != realm.name:
                raise ConfigError(f"realm.credential: from realm {credential.realm}, public key is {realm.name}")
        self._realm, self._credential = realm, credential
        initiator: krb.Initiator | None = None
        self._acceptor: krb.Acceptor | None = None
        if cfg.kerberos is not None:  # this host's keytab: to open sessions, and to accept them
            initiator = krb.Initiator(cfg.kerberos, cfg.host)
            if cfg.listen.token is not None and cfg.listen.token.kerberos:
                self._acceptor = krb.Acceptor(cfg.kerberos, cfg.host, krb.trusted_realms(cfg.kerberos, initiator))
        self._tls = None
        if cfg.client_tls is not None:  # the TLS listener's certificate, or `certificate:` to connect out
            t = cfg.client_tls
            self._tls = TlsMaterial(t.cert, t.key, t.ca, t.pins)
        catalog = Catalog(cfg.state_dir / "catalog.sqlite")
        client = PeerClient(credential, realm, self._tls, cfg.resolve, initiator)
        ports = (cfg.listen.token.port if cfg.listen.token else 0, cfg.listen.tls.port if cfg.listen.tls else 0)
        fault = fault_hook()
        primary = PrimaryEngine(catalog, cfg.state_dir, client, ports, fault)
        replica = ReplicaService(catalog, cfg.state_dir, fault, host=cfg.host)
        primary.source_lock = replica.apply_lock  # extended replication reads copies at committed points
        return Host(config=cfg, catalog=catalog, primary=primary, replica=replica, client=client,
                    failovers=Failovers(catalog, replica, fault))

    async def _serve_socket(self, app: web.Application) -> None:
        self._socket.claim()
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=DRAIN_TIMEOUT)
        await runner.setup()
        self._socket_runner = runner
        self._runners.append(runner)
        await self._bind_socket()

    async def _bind_socket(self) -> None:
        old = os.umask(0o117)  # the socket is created 0660 at most
        try:
            assert self._socket_runner is not None  # set up by _serve_socket
            site = web.UnixSite(self._socket_runner, str(self._socket.path))
            await site.start()
        finally:
            os.umask(old)
        self._socket.bound()
        self._socket_site = site

    async def _restore_socket(self) -> None:
        """SIGHUP with the socket path gone (deleted by hand, by a tmpfiles cleaner, by another
        process): serve the management API on a new socket there."""
        if not self._socket.missing():
            if not self._socket.ours():
                log.warning("daemon.socket_not_ours", socket=str(self._socket.path),
                            reason="another file is at the management socket's path; it is left alone")
            return
        try:
            if self._socket_site is not None:
                await self._socket_site.stop()  # its listening socket has no path any more
            await self._bind_socket()
        except OSError as e:
            log.error("daemon.socket_restore_failed", socket=str(self._socket.path), reason=e.strerror)
            return
        log.info("daemon.socket_restored", socket=str(self._socket.path),
                 reason="SIGHUP: the management socket was missing; a new one serves the API")

    async def _serve_tcp(self, app: web.Application, address: str, port: int, what: str, idle: float,
                         ssl_context=None, limits: ConnectionLimits | None = None) -> None:
        # keepalive_timeout bounds an idle keep-alive connection; a peer listener's limits
        # (transport/listen.py) bound what an unauthenticated connection holds before that
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=DRAIN_TIMEOUT, keepalive_timeout=idle)
        await runner.setup()
        try:
            if limits is not None:
                await CappedSite(runner, address, port, limits, ssl_context=ssl_context).start()
            else:
                await web.TCPSite(runner, address, port, reuse_address=True, ssl_context=ssl_context).start()
        except OSError as e:
            await runner.cleanup()
            reason = os.strerror(e.errno).lower() if e.errno else str(e)  # not aiohttp's message with a tuple in it
            raise ConfigError(f"listen.{what}: cannot listen on {address}:{port}: {reason}") from None
        self._runners.append(runner)

    @staticmethod
    def _limits(what: str, listener, listeners: int) -> ConnectionLimits:
        total, per_address = fit_limits(listener.max_connections, listener.max_connections_per_address, listeners)
        if (total, per_address) != (listener.max_connections, listener.max_connections_per_address):
            log.info("listener.limits", listener=what, max_connections=total, max_connections_per_address=per_address,
                     reason="cut to leave half of the process's open-file limit to files, a quarter of a listener "
                            "to one address")
        return ConnectionLimits(what, total, per_address, listener.header_timeout)

    def _reload(self) -> None:
        """SIGHUP: reload TLS certificate, key and CA; keep the old ones if the new are bad;
        put back a management socket that was deleted."""
        self.notifier.reloading()
        if self._socket_runner is not None:
            self._restoring = asyncio.get_running_loop().create_task(self._restore_socket(), name="restore-socket")
        try:
            if self._tls is None:
                log.info("daemon.reload", reason="SIGHUP: no TLS material to reload")
                return
            try:
                self._tls.reload()
            except ConfigError as e:
                log.error("daemon.reload_failed", reason=str(e), result="keeping the previous certificates")
                return
            log.info("daemon.reloaded", reason="SIGHUP: TLS certificate, key and CA reloaded; new connections use them")
        finally:
            self.notifier.ready("reloaded")

    # the life of the daemon: startup, serve, shutdown ------------------------------------
    async def run(self, *, signals: bool = True) -> int:
        """Startup, serve until asked to stop (SIGTERM/SIGINT, or ``stop()``), shutdown.
        ``signals``: install the process's signal handlers (an in-process test daemon does not)."""
        host = self.host = self._build()
        if signals:
            self._handle_signals()
        try:
            await self.startup(host)
            await self.serve()
        finally:
            await self.shutdown(host)
        log.info("daemon.stopped")
        return 0

    def stop(self) -> None:
        """Ask the daemon to stop, as SIGTERM does."""
        self._stop.set()

    def _handle_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self._reload)

    async def startup(self, host: Host) -> None:
        """Recover, listen, supervise, then say ready."""
        events.bus.attach(asyncio.get_running_loop())
        await self._recover(host)
        await self._listen(host)
        await host.primary.start()  # the supervisors: one task per primary relationship
        self._ready(host)

    async def serve(self) -> None:
        """Serve until asked to stop: connections are the listeners' and the supervisors' tasks."""
        watchdog = asyncio.create_task(self.notifier.watchdog(), name="watchdog")
        try:
            await self._stop.wait()
        finally:
            watchdog.cancel()
        log.info("daemon.stopping", reason="signal received: draining")
        self.notifier.stopping()
        events.bus.close()  # `events --follow` streams end now, not at the drain's end

    async def shutdown(self, host: Host) -> None:
        """Stop accepting, cancel the supervisors and appliers (a half-sent log is dropped
        by the replica and sent again), drain within the timeout, then close the state."""
        await self._stop_accepting()
        await self._cancel_supervisors(host)
        await self._drain()
        await self._close(host)

    # startup steps ----------------------------------------------------------------------
    async def _recover(self, host: Host) -> None:
        """Before anything listens: a failover step cut by a crash (before any apply), then
        every replica copy (half-received logs dropped, interrupted applies finished)."""
        await host.failovers.recover()
        await host.replica.start()

    async def _listen(self, host: Host) -> None:
        """The management socket, the peer listeners (token, TLS), the metrics listener."""
        await self._serve_socket(create_app(host))
        cfg = self.config
        common: dict[str, Any] = dict(
            service=host.replica, catalog=host.catalog, host=cfg.host, admins=cfg.management.admins,
            drain_timeout=DRAIN_TIMEOUT,
            management_socket=cfg.management.socket, on_reverse=functools.partial(reverse.accept, host),
            on_running=functools.partial(split_brain.answer, host),
            may_ask=functools.partial(split_brain.may_ask, host))
        token, tls = cfg.listen.token, cfg.listen.tls
        listeners = (token is not None) + (tls is not None)
        soft, hard = raise_descriptor_limit()
        log.info("daemon.descriptors", open_files=soft, hard_limit=hard,
                 reason="the soft open-file limit raised towards the hard one: connections and files share it")
        if token is not None:
            # a token listener has `realm` or Kerberos or both (config.py)
            assert self._credential is not None or self._acceptor is not None
            ctx = PeerContext(mode="token", realm=self._realm, kerberos=self._acceptor,
                              sessions=SessionStore(self._credential, token.session_timeout),
                              idle_timeout=token.idle_timeout, header_timeout=token.header_timeout, **common)
            ctx.limits = self._limits("token", token, listeners)
            await self._serve_tcp(create_peer_app(ctx), token.address, token.port, "token", token.idle_timeout,
                                  limits=ctx.limits)
        if tls is not None:
            assert self._tls is not None  # the TLS listener's certificate is the client's (_build)
            ctx = PeerContext(mode="certificate", tls=self._tls, idle_timeout=tls.idle_timeout,
                              header_timeout=tls.header_timeout, **common)
            ctx.limits = self._limits("tls", tls, listeners)
            await self._serve_tcp(create_peer_app(ctx), tls.address, tls.port, "tls", tls.idle_timeout,
                                  self._tls.listening, limits=ctx.limits)
        m = cfg.listen.metrics
        if m is not None:
            await self._serve_tcp(metrics.create_app(host.catalog, host.primary.pending_bytes), m.address, m.port,
                                  "metrics", 60.0)

    def _ready(self, host: Host) -> None:
        cfg = self.config
        token, tls, m = cfg.listen.token, cfg.listen.tls, cfg.listen.metrics
        log.info("daemon.ready", host=cfg.host, version=__version__, socket=str(cfg.management.socket),
                 token=f"{token.address}:{token.port}" if token else None,
                 tls=f"{tls.address}:{tls.port}" if tls else None,
                 metrics=f"{m.address}:{m.port}" if m else None)
        if TEST_CLOCK_OFFSET:
            log.warning("daemon.test_clock_offset", seconds=TEST_CLOCK_OFFSET.total_seconds(),
                        reason="REPLICAD_TEST_CLOCK_OFFSET moves this daemon's clock (windows, --at): for tests only")
        self.notifier.ready(f"serving {len(host.catalog.relationships())} relationships")
        self.ready.set()

    # shutdown steps ---------------------------------------------------------------------
    async def _stop_accepting(self) -> None:
        """Close every listening socket (management socket, peer and metrics listeners):
        a new connection is refused from now on; the open ones are served until the drain."""
        if self._restoring is not None:
            self._restoring.cancel()  # a SIGHUP's new management socket must not appear now
            await asyncio.gather(self._restoring, return_exceptions=True)
        for runner in self._runners:
            for site in list(runner.sites):
                await site.stop()

    async def _cancel_supervisors(self, host: Host) -> None:
        """The primary's supervisors (their cycles) and the replica's appliers."""
        await host.primary.stop()
        await host.replica.stop()

    async def _drain(self) -> None:
        """The connections still open end within DRAIN_TIMEOUT (each runner's graceful close)."""
        for r in reversed(self._runners):
            await r.cleanup()

    async def _close(self, host: Host) -> None:
        """The peer client, the catalog (after its last commits, off the loop), the socket
        (only if it is still the one this daemon bound), the state dir's lock."""
        await host.client.close()
        await asyncio.to_thread(host.catalog.close)
        self._socket.remove()
        self._lock.release()


def run(config: Config) -> int:
    logmod.setup(config.log.format, config.log.level)
    return asyncio.run(Daemon(config).run())

"""One daemon per state dir, and a management socket no other process takes away (issue 15,
items 1, 2 and 10): a second daemon on the same state dir exits 2 naming the pid that holds
it; a daemon removes only the socket it created, never a live one it found; SIGHUP puts a
deleted socket back; `events --follow` never holds a stop past the drain."""

import json
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from .harness import BIN, Cluster, free_port, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def host(tmp_path):
    c = Cluster(tmp_path, names=("vmhost1",))
    h = c["vmhost1"]
    h.start()
    yield h
    c.shutdown()


def _second_config(h, tmp_path, **changes) -> str:
    """A config like ``h``'s with other ports and socket, then ``changes`` (top-level keys)."""
    doc = json.loads(h.config.read_text())
    doc["listen"]["token"]["port"] = free_port(h.addr)
    doc["listen"]["tls"]["port"] = free_port(h.addr)
    doc["management"]["socket"] = str(tmp_path / "second.sock")
    doc.update(changes)
    path = h.root / "second.yaml"
    path.write_text(json.dumps(doc))
    return str(path)


def _daemon(config: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN), "daemon", "--config", config], capture_output=True, text=True, timeout=30)


def _answers(h) -> bool:
    return h.cli("server", "get", check=False).returncode == 0


def test_a_second_daemon_neither_starts_nor_touches_the_first(host, tmp_path):
    # the same state dir: refused before anything is served
    state = host.root / "state"
    r = _daemon(_second_config(host, tmp_path))
    assert r.returncode == 2, r.stderr
    assert f"error: state dir {state} is in use by replicad pid {host.proc.pid}" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "second.sock").exists()
    assert _answers(host) and host.proc.poll() is None

    # its own state dir, but the first daemon's socket and token port: it must neither take
    # the socket nor remove it on its way out
    doc = json.loads(host.config.read_text())
    config = Path(_second_config(host, tmp_path, state_dir=str(tmp_path / "other-state")))
    second = json.loads(config.read_text())
    second["management"]["socket"] = str(host.root / doc["management"]["socket"])
    second["listen"]["token"]["port"] = doc["listen"]["token"]["port"]
    config.write_text(json.dumps(second))
    r = _daemon(str(config))
    assert r.returncode == 2, r.stderr
    assert f"management.socket: {host.root / 'state' / 'replicad.sock'} is in use by another daemon" in r.stderr
    assert _answers(host)


def test_sighup_restores_the_socket_and_a_stop_removes_only_its_own(host):
    sock = host.root / "state" / "replicad.sock"
    sock.unlink()
    assert not _answers(host)
    host.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: _answers(host), 10, "the socket to come back after SIGHUP")
    assert oct(sock.stat().st_mode & 0o777) == "0o660"
    assert host.events("daemon.socket_restored")

    # the path now holds a socket this daemon did not create (a new daemon's): it stays
    sock.unlink()
    newcomer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        newcomer.bind(str(sock))
        newcomer.listen()
        assert host.stop() == 0
        assert sock.exists(), "the stopping daemon removed a socket it did not create"
    finally:
        newcomer.close()


def test_events_followers_end_at_once_on_stop(host):
    follower = subprocess.Popen([str(BIN), "events", "--follow", "--config", str(host.config)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(follower.stdout), daemon=True)
    reader.start()
    try:
        # the replayed daemon.ready line: the follower is attached (it follows before replaying)
        wait_for(lambda: any("daemon.ready" in x for x in lines), 10, "the follower to attach")
        t0 = time.monotonic()
        assert host.stop(timeout=15) == 0
        took = time.monotonic() - t0
        follower.wait(timeout=10)
        reader.join(5)
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
        err = follower.stderr.read()
        follower.stdout.close()
        follower.stderr.close()
    assert took < 3.0, f"SIGTERM took {took:.1f}s with a follower attached"
    assert follower.returncode == 0, err
    assert any("daemon.stopping" in x for x in lines), lines
    assert "the daemon is stopping" in err

"""What operators run the daemon with (issue 7): the Prometheus endpoint and systemd's
notify protocol, against real daemon processes."""

import json
import signal
import socket
import subprocess
import threading
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import article_pair
from .harness import BIN, Cluster, free_port, wait_for
from .test_replication import replicated

pytestmark = pytest.mark.integration
MiB = 1 << 20


def with_metrics(host) -> str:
    """Give the host a metrics listener; returns its URL."""
    host.write_config()
    doc = json.loads(host.config.read_text())
    port = free_port(host.addr)
    doc["listen"]["metrics"] = {"address": host.addr, "port": port}
    host.config.write_text(json.dumps(doc))
    return f"http://{host.addr}:{port}/metrics"


def scrape(url: str) -> tuple[str, dict]:
    with urllib.request.urlopen(url, timeout=10) as r:
        ctype = r.headers["Content-Type"]
        text = r.read().decode()
    samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return ctype, samples


def value(samples: dict, name: str, **labels) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_metrics_endpoint_reports_state_health_rpo_and_traffic(cluster, tmp_path):
    urls = {name: with_metrics(cluster[name]) for name in ("vmhost1", "vmhost2")}
    primary, replica = article_pair(cluster)
    image, copy = replicated(primary, replica, "m", tmp_path, 16 * MiB, 4, frequency=3600)
    delta = primary.json("replication", "sync", "m", "--wait")
    initial_sent = primary.json("replication", "measure", "m")["initial_replication_size"]

    ctype, s = scrape(urls["vmhost2"])
    assert ctype.startswith("text/plain; version=0.0.4")
    p = {"vm": "m", "role": "primary"}
    assert value(s, "replicad_replication_state", **p, state="Replicating") == 1
    assert value(s, "replicad_replication_state", **p, state="Suspended") == 0
    assert value(s, "replicad_replication_health", **p, health="Normal") == 1
    assert 0 <= value(s, "replicad_last_successful_cycle_age_seconds", **p) < 60
    assert value(s, "replicad_sent_bytes_total", **p) == initial_sent + delta["bytes_sent"]
    assert value(s, "replicad_cycles_total", **p, kind="initial") == 1
    assert value(s, "replicad_cycles_total", **p, kind="delta") == 1
    assert value(s, "replicad_cycle_duration_seconds_count", **p) == 2
    assert value(s, "replicad_sequence", **p) == 2
    assert value(s, "replicad_pending_bytes", **p) == 0
    version = primary.cli("--version").stdout.split()[-1]
    assert value(s, "replicad_build_info", version=version) == 1

    _, r = scrape(urls["vmhost1"])
    q = {"vm": "m", "role": "replica"}
    assert value(r, "replicad_received_bytes_total", **q) == initial_sent + delta["bytes_sent"]
    assert value(r, "replicad_replication_state", **q, state="Replicating") == 1

    primary.cli("replication", "suspend", "m")
    _, s = scrape(urls["vmhost2"])
    assert value(s, "replicad_replication_state", **p, state="Suspended") == 1
    assert value(s, "replicad_replication_health", **p, health="Warning") == 1

    replica.stop()  # a failing cycle is counted as an error and a missed cycle
    primary.cli("replication", "resume", "m")
    r = primary.cli("replication", "sync", "m", "--wait", check=False)
    assert r.returncode == 1
    _, s = scrape(urls["vmhost2"])
    assert value(s, "replicad_cycle_errors_total", **p) >= 1
    assert value(s, "replicad_missed_cycles_total", **p) >= 1
    assert value(s, "replicad_replication_health", **p, health="Critical") == 1


class NotifySocket:
    """The datagram socket systemd would give the service."""

    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages: list[dict] = []

    def wait(self, key: str, value: str = "1", timeout: float = 15) -> dict:
        """The next message with key=value (earlier ones are kept in ``messages``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                raw = self.sock.recv(4096).decode()
            except TimeoutError:
                break
            msg = dict(line.split("=", 1) for line in raw.splitlines() if "=" in line)
            self.messages.append(msg)
            if msg.get(key) == value:
                return msg
        raise AssertionError(f"no {key}={value} within {timeout}s; got {self.messages}")


@pytest.fixture
def notify_socket(tmp_path):
    n = NotifySocket(tmp_path / "notify.sock")
    yield n
    n.sock.close()


def test_sd_notify_ready_watchdog_reload_stopping(tmp_path, notify_socket):
    c = Cluster(tmp_path / "c", names=("vmhost1",))
    host, n = c["vmhost1"], notify_socket
    host.start(env={"NOTIFY_SOCKET": n.path, "WATCHDOG_USEC": "400000"})
    ready = n.wait("READY")
    assert ready["MAINPID"] == str(host.proc.pid) and "STATUS" in ready
    assert b'"daemon.ready"' in host.log.read_bytes()  # READY=1 comes after recovery and listening
    n.wait("WATCHDOG")
    n.wait("WATCHDOG")  # pinged again, at half the 0.4 s period

    host.proc.send_signal(signal.SIGHUP)
    reloading = n.wait("RELOADING")
    assert int(reloading["MONOTONIC_USEC"]) > 0
    n.wait("READY")

    host.proc.send_signal(signal.SIGSTOP)  # a stuck process: no pings while it cannot run
    try:
        with pytest.raises(AssertionError):
            n.wait("WATCHDOG", timeout=1.0)
    finally:
        host.proc.send_signal(signal.SIGCONT)
    host.proc.send_signal(signal.SIGTERM)
    n.wait("STOPPING")
    assert host.proc.wait(15) == 0


def test_events_show_state_changes_and_follow_new_ones(tmp_path):
    c = Cluster(tmp_path / "c", names=("vmhost1", "vmhost2"))
    try:
        primary, replica = article_pair(c)
        replicated(primary, replica, "ev", tmp_path, 8 * MiB, 2, frequency=3600)
        lines = [json.loads(x) for x in primary.cli("events", "--vm", "ev", "-o", "json").stdout.splitlines()]
        assert [e["event"] for e in lines if e["event"] == "cycle.done"] == ["cycle.done"]
        assert all(e["vm"] == "ev" for e in lines) and any(e["event"] == "replication.enabled" for e in lines)
        table = primary.cli("events").stdout
        assert "cycle.done" in table and "kind=initial" in table

        follow = subprocess.Popen([str(BIN), "events", "--follow", "--vm", "ev", "-o", "json", "--config",
                                   str(primary.config)], stdout=subprocess.PIPE, text=True)
        try:
            seen = []
            reader = threading.Thread(target=lambda: seen.extend(json.loads(x) for x in follow.stdout), daemon=True)
            reader.start()
            wait_for(lambda: any(e["event"] == "cycle.done" for e in seen), 10, "the replayed events")
            primary.cli("replication", "suspend", "ev")  # state changes arrive as they happen
            wait_for(lambda: any(e["event"] == "replication.suspended" for e in seen), 10, "the suspension")
            assert follow.poll() is None  # still following
        finally:
            follow.terminate()
            follow.wait(10)
            reader.join(10)
            follow.stdout.close()
        r = primary.cli("events", "-C", replica.fqdn, check=False)
        assert r.returncode == 2 and "on the host itself" in r.stderr
    finally:
        c.shutdown()

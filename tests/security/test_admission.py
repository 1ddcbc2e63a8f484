"""What a peer may hold on a replica server, decided before it holds it: authorization
(principal, trust group, ownership of the id) before any VM lock or body byte (issue 13
item 3); a header deadline, a few log connections per principal and thread pools of
their own (item 2). vmhost1 is the replica server, vmhost2 (Finance) replicates `ledger`
to it, vmhost3 (Engineering) is the attacker (conftest.py)."""

import select
import threading
import time
import uuid

import pytest

from replicad.transport.client import LOGS_PER_REPLICA

from ..integration.harness import wait_for
from .helpers import LogPut, assert_unchanged, header_preamble, snapshot, three_hosts

pytestmark = pytest.mark.integration
NEW_ID = "0f0e0d0c-0000-4000-8000-0000000000cc"


def _events(host, peer: str, *names: str) -> list[dict]:
    return [ev for name in names for ev in host.events(name) if ev.get("peer") == peer]


class Trickle(threading.Thread):
    """An attacker's log: a preamble announcing a 60,000-byte header, then one byte every
    ``every`` seconds (inside the 2 s idle timeout) until the replica answers or closes,
    or ``until`` seconds passed. ``answer`` is what the replica said, ``ended`` when.
    Once ``stop`` is set it sends no more, and waits up to ``settle`` seconds for an
    answer already on its way (a refusal of the request's head needs no more bytes)."""

    def __init__(self, put: LogPut, every: float = 0.5, until: float = 20.0, settle: float = 0.0):
        super().__init__(daemon=True)
        self.put, self.every, self.until, self.settle = put, every, until, settle
        self.answer: tuple[int, dict] | None = None
        self.ended: float | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        start = time.monotonic()
        try:
            if self.put.mode == "token" and not self.put.upgraded():
                self.answer = self.put.answer()
                return
            self.put.send(header_preamble(60000) + b"{")
            while not self.stop.wait(self.every) and time.monotonic() - start < self.until:
                if self.put.readable():
                    self.answer = self.put.answer()
                    return
                self.put.send(b" ")
            settled = time.monotonic() + self.settle
            while True:
                if self.put.readable():
                    self.answer = self.put.answer()
                    return
                if time.monotonic() >= settled:
                    return
                select.select([self.put.sock], [], [], 0.1)  # wakes when the replica says something
        except OSError:
            self.answer = self.answer or (0, {})
        finally:
            self.ended = time.monotonic() - start
            self.put.close()


def test_another_trust_group_is_refused_before_the_vms_lock_or_any_body_byte(three):
    """vmhost3 sends a log for vmhost2's VM and trickles its header: it took the VM's
    receive lock before the trust-group check and held it for as long as it trickled
    (59 s on port 80, 36 s on 443), delaying vmhost2's cycles. Now the request alone is
    refused (403) before the 101 or any byte of the log is read, and vmhost2's cycle runs."""
    c, v1, v2, v3 = three
    vm_id = v2.json("vm", "get", "ledger")["id"]
    before = snapshot(v1)

    put = LogPut(c, v3, v1, vm_id, 99)
    status, doc = put.answer(timeout=5)  # the request's head is all it sends
    put.close()
    assert status == 403 and "Engineering" in doc.get("error", ""), (status, doc)
    assert_unchanged(before, snapshot(v1))
    refusal = _events(v1, v3.fqdn, "peer.refused")
    assert refusal and "trust group" in refusal[-1]["reason"], refusal

    # the same attack, trickling: it must not hold up vmhost2's own cycle of that VM
    attack = Trickle(LogPut(c, v3, v1, vm_id, 100), settle=10)
    attack.start()
    t0 = time.monotonic()
    v2.json("replication", "sync", "ledger", "--wait")
    took = time.monotonic() - t0
    attack.stop.set()
    attack.join(30)
    assert attack.answer is not None and attack.answer[0] == 403, attack.answer
    assert took < 10, f"vmhost2's cycle waited {took:.1f}s behind another trust group's request"


def test_a_dropped_log_connection_is_logged_with_its_peer_not_a_traceback(three):
    """An authorized peer that drops its connection in the middle of a log: one line
    naming the peer and the reason (`log.rejected` or `peer.refused`), no aiohttp
    traceback, nothing kept."""
    c, v1, _, v3 = three
    before = snapshot(v1)
    put = LogPut(c, v3, v1, NEW_ID, 1)  # a new VM of its own: it is allowed to send this
    if c.auth == "token":
        assert put.upgraded()
    put.send(header_preamble(60000) + b'{"vm_id": ')
    put.close()
    lines = wait_for(lambda: _events(v1, v3.fqdn, "log.rejected", "peer.refused"), 10, "the dropped log logged")
    assert any("connection" in ev.get("reason", "") for ev in lines), lines
    text = v1.log.read_text()
    assert "Traceback" not in text and "Error handling request" not in text, text[-3000:]
    assert_unchanged(before, snapshot(v1))


@pytest.fixture(params=["token", "certificate"])
def three_quick(tmp_path, request):
    """The three hosts, vmhost1's header deadline at 3 s (10 s by default)."""
    yield from three_hosts(tmp_path, request.param, header_timeout=3)


def test_trickled_log_headers_starve_no_other_peer(three_quick):
    """Eight connections of one authorized primary announcing 60,000-byte headers, one byte
    at a time, took every thread of the default pool (6 on 2 cores): another primary's
    one-second cycle took 45 s. Now a peer gets at most LOGS_PER_REPLICA logs at once (429
    beyond), a header must be whole within the listener's header_timeout (408), headers
    are read on the event loop (no thread held), and vmhost2's cycles keep their pace."""
    c, v1, v2, v3 = three_quick
    ledger = v2.json("vm", "get", "ledger")["id"]
    before = snapshot(v1, leave_out=(ledger,))
    stop = threading.Event()
    answers: list[tuple[int, float]] = []  # (status, seconds the connection lasted)
    opened: list[LogPut] = []

    def siege() -> None:  # eight connections at all times, each reopened when it ends
        while not stop.is_set():
            put = LogPut(c, v3, v1, str(uuid.uuid4()), 1)
            opened.append(put)
            t = Trickle(put, every=0.5, until=30)
            t.run()
            answers.append(((t.answer or (0, {}))[0], t.ended))
    threads = [threading.Thread(target=siege, daemon=True) for _ in range(8)]
    for t in threads:
        t.start()
    wait_for(lambda: len(opened) >= 8, 20, "the siege to be under way")
    took = []
    for _ in range(3):
        t0 = time.monotonic()
        v2.json("replication", "sync", "ledger", "--wait")
        took.append(time.monotonic() - t0)
    stop.set()
    for t in threads:
        t.join(40)
    assert max(took) < 5, f"vmhost2's cycles took {took} under the siege"
    statuses = [a for a, _ in answers]
    assert 429 in statuses and 408 in statuses, answers
    assert set(statuses) <= {408, 429}, answers
    # an admitted header is cut at its deadline (3 s), not kept alive by each trickled byte
    assert all(seconds < 3 + 2.5 for status, seconds in answers if status == 408), answers
    refusals = [ev for ev in v1.events("peer.refused") if ev.get("peer") == v3.fqdn]
    assert any("header_timeout" in ev["reason"] for ev in refusals), refusals[-3:]
    assert any(f"already sends {LOGS_PER_REPLICA}" in ev["reason"] for ev in refusals), refusals[-3:]
    assert_unchanged(before, snapshot(v1, leave_out=(ledger,)))

"""Forged requests from authenticated hosts, over both listeners: trust groups, paths,
oversized and truncated frames, protocol versions, slow clients."""

import asyncio
import os
import socket
import struct
import time

import pytest

from replicad.tracking.digestmap import map_bytes
from replicad.transport import raw
from replicad.wire import MAX_HEADER, DiskInfo, Header, LogEncoder

from ..integration.harness import replica_disk, wait_for
from .helpers import assert_unchanged, bad_checksum_log, body, forge, log_bytes, padded_header, raw_push, snapshot
from .helpers import three_hosts as _three  # noqa: F401 — other security tests import it from here

pytestmark = pytest.mark.integration
MiB = 1 << 20
def test_trust_groups_cannot_be_crossed_with_a_guessed_vm_id(three, tmp_path):
    c, v1, v2, v3 = three
    vm_id = v2.json("vm", "get", "ledger")["id"]
    rel = v1.json("replication", "get", "ledger")
    copy = replica_disk(v1, "ledger")
    before = snapshot(v1)

    e = forge(c, v1, lambda conv: conv.replica_status(vm_id))
    assert "403" in str(e) and "belongs to another primary" in str(e) and "Finance" not in str(e)
    # the copy's block digests (a resync's first request) tell what the copy holds
    stolen = tmp_path / "stolen"
    e = forge(c, v1, lambda conv: conv.fetch_digests(vm_id, stolen, [map_bytes(copy.stat().st_size)]))
    assert "403" in str(e) and "belongs to another primary" in str(e), e
    assert not stolen.exists() or not any(stolen.iterdir())

    def delta(conv):
        h = Header(vm_id, "ledger", "0" * 16, rel["sequence"] + 1, rel["sequence"], "delta", "t", "crash",
                   (DiskInfo(0, copy.name, copy.stat().st_size),))
        return conv.push_log(vm_id, h.seq, body(log_bytes(h, conv, [(0, b"pwned" * 800)])))
    e = forge(c, v1, delta)
    assert "403" in str(e) and "Engineering" in str(e)

    def initial(conv):  # overwrite it with a fresh "initial" copy
        h = Header(vm_id, "ledger", "1" * 16, 1, 0, "initial", "t", "crash", (DiskInfo(0, copy.name, 4096),))
        return conv.push_log(vm_id, 1, body(log_bytes(h, conv, [(0, b"x" * 4096)])))
    e = forge(c, v1, initial)
    assert "403" in str(e)
    assert_unchanged(before, snapshot(v1))
    refusals = [ev for ev in v1.events("peer.refused") if ev.get("peer") == v3.fqdn]
    assert len(refusals) == 4


NEW_ID = "0f0e0d0c-0000-4000-8000-0000000000aa"


@pytest.mark.slow  # long: `make test-slow` (.ci/run runs it); README, Development
@pytest.mark.parametrize("case", ["disk-path", "absolute-disk", "vm-name", "header-mismatch"])
def test_path_tricks_in_a_log_are_refused(three, case):
    c, v1, _, _ = three
    before = snapshot(v1)
    disk, name, url_id = "disk.img", "web", NEW_ID
    if case == "disk-path":
        disk = "../../../../tmp/evil.img"
    elif case == "absolute-disk":
        disk = "/etc/cron.d/evil"
    elif case == "vm-name":
        name = "../../etc"

    def send(conv):
        h = Header(NEW_ID, name, "2" * 16, 1, 0, "initial", "t", "crash", (DiskInfo(0, disk, 8192),))
        vid = "0f0e0d0c-0000-4000-8000-0000000000bb" if case == "header-mismatch" else url_id
        return conv.push_log(vid, 1, body(log_bytes(h, conv, [(0, b"e" * 4096)])))
    e = forge(c, v1, send)
    assert "400" in str(e), e
    assert_unchanged(before, snapshot(v1))


@pytest.mark.slow  # long: `make test-slow` (.ci/run runs it); README, Development
@pytest.mark.parametrize("case", ["huge-header", "huge-record", "truncated", "garbage", "bad-checksum"])
def test_oversized_and_truncated_frames_are_refused(three, case):
    c, v1, _, _ = three
    before = snapshot(v1)

    def send(conv):
        h = Header(NEW_ID, "web", "3" * 16, 1, 0, "initial", "t", "crash", (DiskInfo(0, "disk.img", 8 * MiB),))
        if case == "huge-header":
            raw = struct.pack("<4sHI", b"RPLG", 1, 1 << 30) + b"{" * 1000
        elif case == "huge-record":
            enc = LogEncoder(h, mac_key=conv.mac_key)
            raw = enc.start() + struct.pack("<BBHQIIQ", 1, 0, 0, 0, 1 << 31, 1 << 31, 0) + b"x" * 1000
        elif case == "truncated":
            raw = log_bytes(h, conv, [(0, b"t" * 100000)])[:-40]
        elif case == "bad-checksum":  # MACs and digest right: only the record checksum is wrong
            raw = bad_checksum_log(h, conv, [(0, b"c" * 100000), (4 * MiB, b"d" * 100000)], bad=0)
        else:
            raw = b"\x00GARBAGE" * 1000
        return conv.push_log(NEW_ID, 1, body(raw))
    e = forge(c, v1, send)
    assert "400" in str(e), e
    if case == "bad-checksum":  # refused by the record itself, not later by the digest
        assert "record checksum mismatch" in str(e), e
    assert_unchanged(before, snapshot(v1))
    assert v1.json("vm", "list")[0]["name"] == "ledger" and len(v1.json("vm", "list")) == 1


def test_unknown_protocol_version_is_refused(three):
    c, v1, _, _ = three

    async def send(conv):
        conv.client.http().headers["X-Replicad-Protocol"] = "99"
        return await conv.request("GET", "/v1/hello")
    e = forge(c, v1, send)
    assert "400" in str(e) and "unsupported protocol version" in str(e)


def test_a_client_that_never_finishes_its_headers_is_disconnected(three):
    c, v1, _, _ = three
    port = v1.port  # the plain listener: the stall happens before any authentication
    s = socket.create_connection((v1.addr, port), timeout=10)
    s.sendall(b"PUT /v1/replicas/x/logs/1 HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    t = time.monotonic()
    assert s.recv(100) == b""  # closed by the server, after the idle timeout
    assert 1.5 < time.monotonic() - t < 8
    s.close()


def test_a_stalled_body_is_dropped_and_leaves_nothing(three):
    c, v1, _, _ = three
    before = snapshot(v1)

    async def stall(conv):
        h = Header(NEW_ID, "web", "4" * 16, 1, 0, "initial", "t", "crash", (DiskInfo(0, "disk.img", 8 * MiB),))
        raw = log_bytes(h, conv, [(0, b"s" * 200000)])

        async def slow():
            yield raw[:100000]
            await asyncio.sleep(6)  # the attacker goes quiet mid-body
            yield raw[100000:]
        return await conv.push_log(NEW_ID, 1, slow())
    e = forge(c, v1, stall)
    assert e is not None
    wait_for(lambda: any("stalled" in ev.get("reason", "") for ev in v1.events("peer.refused")), 10, "the stall")
    assert_unchanged(before, snapshot(v1))


# --- the token listener's upgraded log connection (transport/raw.py) ----------------------
@pytest.mark.parametrize("case", ["huge-header", "huge-record", "truncated", "garbage", "altered", "stalled",
                                  "bad-checksum", "header-one-over"])
@pytest.mark.slow  # long: `make test-slow` (.ci/run runs it); README, Development
def test_forged_logs_on_the_upgraded_connection_are_refused(three_token, case):
    """The raw receiver reads item by item from the socket: every bound, MAC and timeout the
    chunked path enforces holds there too, and nothing of a refused log stays."""
    c, v1, _, _ = three_token
    before = snapshot(v1)

    def send(conv):
        h = Header(NEW_ID, "web", "5" * 16, 1, 0, "initial", "t", "crash", (DiskInfo(0, "disk.img", 8 * MiB),))
        # random data: not compressed, so its records are received straight into the write buffer
        good = log_bytes(h, conv, [(0, os.urandom(300000)), (1 << 20, os.urandom(5000))])
        if case == "huge-header":
            return raw_push(conv, NEW_ID, 1, struct.pack("<4sHI", b"RPLG", 1, 1 << 30) + b"{" * 1000)
        if case == "huge-record":
            enc = LogEncoder(h, mac_key=conv.mac_key)
            return raw_push(conv, NEW_ID, 1, enc.start() + struct.pack("<BBHQIIQ", 1, 0, 0, 0, 1 << 31, 1 << 31, 0))
        if case == "truncated":
            return raw_push(conv, NEW_ID, 1, good[:-40])
        if case == "garbage":
            return raw_push(conv, NEW_ID, 1, b"\x00GARBAGE" * 1000)
        if case == "header-one-over":  # a well-formed header, MAC included, one byte over MAX_HEADER
            return raw_push(conv, NEW_ID, 1, padded_header(h, conv, MAX_HEADER + 1))
        if case == "bad-checksum":  # MACs and digest right: only the record checksum is wrong
            return raw_push(conv, NEW_ID, 1, bad_checksum_log(h, conv, [(0, os.urandom(300000)),
                                                                         (1 << 20, os.urandom(5000))], bad=0))
        if case == "altered":
            bad = bytearray(good)
            bad[len(good) // 2] ^= 1  # inside the first record's payload
            return raw_push(conv, NEW_ID, 1, bytes(bad))
        return raw_push(conv, NEW_ID, 1, good, pause_after=100000, pause=5)  # quiet past the 2 s idle timeout
    e = forge(c, v1, send)
    # a log cut short while the connection stays open is a stall, like a silent one
    expected = {"truncated": "408", "stalled": "408", "altered": "MAC mismatch",
                "bad-checksum": "record checksum mismatch", "header-one-over": "exceeds"}.get(case, "400")
    assert expected in str(e), e
    if case == "stalled":
        assert any("stalled" in ev.get("reason", "") for ev in v1.events("peer.refused"))
    assert_unchanged(before, snapshot(v1))
    assert [v["name"] for v in v1.json("vm", "list")] == ["ledger"]


def test_an_upgraded_log_request_with_a_body_is_refused(three_token):
    c, v1, _, _ = three_token
    before = snapshot(v1)

    async def send(conv):
        path = f"/v1/replicas/{NEW_ID}/logs/1"
        headers, counter = conv._prepare("PUT", path, None)
        headers.update({"Connection": "Upgrade", "Upgrade": raw.UPGRADE})
        status, answer, rh = await conv._send("PUT", path, b"RPLG" + b"x" * 100, headers)
        return conv._finish(status, answer, rh, counter)
    e = forge(c, v1, send)
    assert "400" in str(e) and "no body" in str(e), e
    assert_unchanged(before, snapshot(v1))

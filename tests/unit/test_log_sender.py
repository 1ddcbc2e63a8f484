"""The primary's LogSender (transport/endpoints.py, implemented by transport/client.py's
Conversation): ``push`` returns the replica's acknowledgement or raises — the log source's
own failure as itself (a local OSError as a transient local I/O error, never as the
network's), with nothing reported on the side. The replica here is a socket that reads the
chunked PUT and answers as a replica server does."""

from __future__ import annotations

import asyncio
import errno
import json
import socket
import threading
from dataclasses import dataclass, field

import pytest

from replicad.errors import PeerUnreachable, ReplicadError, ResyncRequired
from replicad.transport.client import PeerClient


@dataclass
class Progress:
    sent: int = 0
    changed: asyncio.Event | None = None


@dataclass
class Source:
    """A LogSource: two batches, or a failure after the first."""

    fail: BaseException | None = None
    progress: Progress = field(default_factory=Progress)
    closed: bool = False

    def batches(self):
        try:
            yield [b"first batch"]
            if self.fail is not None:
                raise self.fail
            yield [b"second ", memoryview(b"batch")]
        finally:
            self.closed = True


class Replica:
    """Accepts one connection, reads the request to its end (or to the sender's close),
    answers 200 with an acknowledgement when the log ended."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.received = b""
        self.thread = threading.Thread(target=self._serve)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            while not self.received.endswith(b"\r\n0\r\n\r\n"):
                got = conn.recv(65536)
                if not got:
                    return  # the sender gave up: no answer
                self.received += got
            body = json.dumps({"acked_seq": 7, "applied_seq": 6}).encode()
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))

    def close(self) -> None:
        self.thread.join(timeout=30)
        self.sock.close()


@pytest.fixture
def replica():
    r = Replica()
    yield r
    r.close()


async def _push(port: int, source: Source) -> dict:
    client = PeerClient(None, None, None, {})
    conv = client.conversation("127.0.0.1", port, "token")  # not entered: no session, plain chunked PUT
    try:
        return await conv.push("0f0e0d0c-0000-4000-8000-00000000e001", 7, source)
    finally:
        await client.close()


def test_push_returns_the_acknowledgement(replica):
    source = Source()
    assert asyncio.run(_push(replica.port, source)) == {"acked_seq": 7, "applied_seq": 6}
    assert source.progress.sent == len(b"first batch") + len(b"second batch") and source.closed
    assert replica.received.startswith(b"PUT /v1/replicas/0f0e0d0c-0000-4000-8000-00000000e001/logs/7 HTTP/1.1")


def test_a_local_io_failure_is_raised_as_the_primarys_own(replica):
    source = Source(fail=OSError(errno.ENOSPC, "No space left on device", "/state/maps/x/000000000007.tmp"))
    with pytest.raises(ReplicadError) as caught:
        asyncio.run(_push(replica.port, source))
    e = caught.value
    assert not isinstance(e, PeerUnreachable) and e.transient
    assert str(e) == "local I/O error /state/maps/x/000000000007.tmp: No space left on device"
    assert source.closed


def test_the_sources_own_error_is_raised_as_itself(replica):
    error = ResyncRequired("the digest maps of acknowledged cycle 6 are missing")
    with pytest.raises(ResyncRequired) as caught:
        asyncio.run(_push(replica.port, Source(fail=error)))
    assert caught.value is error

"""What a primary reads from a peer is bounded by what it asked for and authenticated as it
streams, or before it is kept (issue 13 item 8). A man in the middle on port 80 answered a
resync's digests request with an endless body and grew the primary from 67 MiB to 4.1 GiB
before the MAC failed; the session answer was read whole the same way."""

import json

import pytest

from ..integration.harness import Cluster, free_port, wait_applied
from ..integration.images import make_sparse_image
from .helpers import assert_unchanged, snapshot
from .proxy import FloodProxy

pytestmark = pytest.mark.integration
MiB = 1 << 20


@pytest.fixture
def intercepted(tmp_path):
    """vmhost2 replicates `ledger` to vmhost1 on port 80 through a man in the middle."""
    c = Cluster(tmp_path, names=("vmhost1", "vmhost2"), auth="token")
    v1, v2 = c["vmhost1"], c["vmhost2"]
    v1.start()
    v2.start()
    v1.cli("server", "set", "--enabled", "true", "--auth", "token", "--allow-any-server", "false")
    v1.cli("auth-entry", "add", "--primary", v2.fqdn, "--trust-group", "Finance")
    port = free_port("127.0.0.1")
    with FloodProxy(("127.0.0.1", port), (v1.addr, v1.port)) as proxy:
        image = tmp_path / "ledger.img"
        make_sparse_image(image, 8 * MiB, data_pieces=2)
        v2.cli("vm", "add", "ledger", "--disk", str(image))
        v2.cli("replication", "enable", "ledger", "--replica-server", v1.fqdn, "--replica-port", str(port),
               "--frequency", "3600")
        v2.json("replication", "start-initial", "ledger", "--wait")
        wait_applied(v2, v1, "ledger")
        yield c, v1, v2, proxy
    c.shutdown()


def peak_memory(host) -> int:
    """The daemon's peak resident memory so far (VmHWM), in bytes."""
    with open(f"/proc/{host.proc.pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.mark.parametrize("answer", ["digests", "session"])
def test_an_endless_answer_from_the_middle_is_cut_short(intercepted, answer):
    c, v1, v2, proxy = intercepted
    ledger = v2.json("vm", "get", "ledger")["id"]
    def own_files() -> dict:
        """The primary's own files — its disks, its baselines — but the catalog (the cycle's
        error is recorded there) and the shared, empty folder resyncs work in."""
        snap = snapshot(v2)
        return {"vm_files": snap["vm_files"], "state": {k: v for k, v in snap["state"].items() if k != "resync"}}
    before = own_files()
    base = peak_memory(v2)
    if answer == "digests":
        # a plausible first line announcing a one-byte map, then a "trailer" that never ends
        meta = {"applied_seq": 1, "epoch": "0" * 16, "modified": False, "discard_ok": False, "sizes": [1]}
        proxy.prefix = (json.dumps(meta) + "\n").encode() + b"x"
        proxy.marker = f"GET /v1/replicas/{ledger}/digests".encode()
        r = v2.cli("replication", "resync", "ledger", "--wait", check=False)
    else:
        proxy.marker = b"POST /v1/session"
        r = v2.cli("replication", "sync", "ledger", "--wait", check=False)
    assert proxy.marker is None, "the request never came"
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    grown = peak_memory(v2) - base
    assert grown < 64 * MiB, f"the primary grew {grown / MiB:.0f} MiB on {proxy.flooded / MiB:.0f} MiB of answer"
    assert proxy.flooded < 64 * MiB, f"the primary read {proxy.flooded / MiB:.0f} MiB of an answer it never asked for"
    assert_unchanged(before, own_files())
    # and the next cycle, without the man in the middle, goes through
    v2.json("replication", "resync" if answer == "digests" else "sync", "ledger", "--wait")

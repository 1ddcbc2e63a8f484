"""What an authorized peer can make a replica server store or spend: hostile compressed
records, squatted VM ids and names, undo and map amplification, quotas. vmhost1 is the
replica server (`--auth both`), vmhost2 replicates `ledger` to it in trust group
Finance, vmhost3 (Engineering) is the attacker (fixtures in test_forged_requests.py)."""

import json

import pytest

from replicad.wire import DiskInfo, Header

from .frames import hostile_log
from .helpers import snapshot
from .test_forged_requests import NEW_ID, _three, body, forge, raw_push

pytestmark = pytest.mark.integration
MiB = 1 << 20


def _refusals(host, peer: str, event: str = "log.rejected") -> list[dict]:
    return [ev for ev in host.events(event) if ev.get("peer") == peer]


@pytest.fixture(scope="module", params=["token", "certificate"])
def shared(tmp_path_factory, request):
    """One cluster for the attacks that must change nothing (each test proves it with a
    snapshot): they share its start-up cost."""
    yield from _three(tmp_path_factory.mktemp(request.param), request.param)


# --- item 13: a corrupted compressed record --------------------------------------------
def test_a_hostile_compressed_record_is_refused_as_a_bad_log(shared):
    """A frame declaring 1 TiB made the decompressor raise MemoryError, past the replica's
    handling of bad logs (a 500 and a traceback). Now: 400, `log.rejected` naming the
    peer, nothing kept — over both listeners, and on the token listener's upgraded
    connection too, where records are pulled off the socket (LogDecoder.pull)."""
    c, v1, _, v3 = shared
    before = snapshot(v1)
    h = Header(NEW_ID, "web", "6" * 16, 1, 0, "initial", "t", "crash", (DiskInfo(0, "disk.img", 8 * MiB),))
    senders = {"chunked": lambda conv, raw: conv.push_log(NEW_ID, 1, body(raw))}
    if c.auth == "token":
        senders["upgraded"] = lambda conv, raw: raw_push(conv, NEW_ID, 1, raw)
    for path, send in senders.items():
        rejected = len(_refusals(v1, v3.fqdn))
        e = forge(c, v1, lambda conv: send(conv, hostile_log(h, key=conv.mac_key, content_size=1 << 40)))
        assert "400" in str(e) and "declares" in str(e), (path, e)
        assert len(_refusals(v1, v3.fqdn)) == rejected + 1, f"{path}: no log.rejected naming vmhost3"
        assert snapshot(v1) == before, path


def test_a_hostile_compressed_record_on_media_is_refused_by_import_initial(shared, tmp_path):
    """`import-initial` reads the same records from a file: one clear error line, no
    traceback, nothing imported."""
    c, v1, _, v3 = shared
    before = snapshot(v1)
    h = Header(NEW_ID, "web", "8" * 16, 1, 0, "initial", "t", "crash", (DiskInfo(0, "disk.img", 8 * MiB),))
    (tmp_path / "web.rlog").write_bytes(hostile_log(h, content_size=1 << 40))
    (tmp_path / "web.json").write_text(json.dumps({"vm_id": NEW_ID, "vm_name": "web", "primary": v3.fqdn}))
    r = v1.cli("replication", "import-initial", "web", "--path", str(tmp_path), check=False)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "declares" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and "Traceback" not in v1.log.read_text()
    assert snapshot(v1) == before

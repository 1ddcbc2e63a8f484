"""What an authorized peer can make a replica server store or spend: hostile compressed
records, squatted VM ids and names, undo and map amplification, quotas. vmhost1 is the
replica server (`--auth both`), vmhost2 replicates `ledger` to it in trust group
Finance, vmhost3 (Engineering) is the attacker (fixtures in test_forged_requests.py)."""

import json
import os
import time
from pathlib import Path

import pytest

from replicad.tracking.digestmap import map_bytes
from replicad.wire import DiskInfo, Header, LogEncoder

from ..integration.harness import Cluster, wait_for
from ..integration.images import make_sparse_image
from .frames import hostile_log
from .helpers import body, converse, forge, log_bytes, raw_push, snapshot, three_hosts

NEW_ID = "0f0e0d0c-0000-4000-8000-0000000000aa"

pytestmark = pytest.mark.integration
MiB = 1 << 20


def _refusals(host, peer: str, event: str = "log.rejected") -> list[dict]:
    return [ev for ev in host.events(event) if ev.get("peer") == peer]


@pytest.fixture(scope="module", params=["token", "certificate"])
def shared(tmp_path_factory, request):
    """One cluster for the attacks that must change nothing (each test proves it with a
    snapshot): they share its start-up cost."""
    yield from three_hosts(tmp_path_factory.mktemp(request.param), request.param)


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


# --- item 5: squatting a VM id or name ------------------------------------------------------
PAYROLL = "0f0e0d0c-0000-4000-8000-0000000000cc"


def initial(conv, vm_id: str, name: str, *, size: int = 48 * MiB, upto: int | None = None, epoch: str = "9" * 16):
    """An initial log of zero-filled 4 MiB records (tiny on the wire), whole, or cut short
    after ``upto`` bytes of records: the connection ends without a trailer."""
    h = Header(vm_id, name, epoch, 1, 0, "initial", "t", "crash", (DiskInfo(0, "payroll.img", size),))
    enc = LogEncoder(h, mac_key=conv.mac_key)

    async def gen():
        yield enc.start()
        for off in range(0, size if upto is None else upto, 4 * MiB):
            yield enc.data(0, off, bytes(4 * MiB))
        if upto is None:
            yield enc.finish()
    return conv.push_log(vm_id, 1, gen())


def test_a_pending_initial_binds_its_id_and_name_to_its_primary(three):
    """vmhost2's first copy of payroll2 is cut short (what it made durable stays, to be
    resumed). vmhost3 then sends an initial with the same id and name — it used to get the
    VM created in its own trust group, and vmhost2 was refused. Now vmhost3 is refused,
    learning nothing about the other group, and vmhost2 completes its copy in Finance."""
    c, v1, v2, v3 = three
    cut = converse(c, v2, v1, lambda conv: initial(conv, PAYROLL, "payroll2", upto=40 * MiB))
    assert isinstance(cut, Exception), "the cut-short initial was acknowledged"
    assert any(ev.get("peer") == v2.fqdn for ev in v1.events("initial.interrupted")), "no durable progress kept"
    before = snapshot(v1)

    same_id = forge(c, v1, lambda conv: initial(conv, PAYROLL, "payroll2"))
    other_id = forge(c, v1, lambda conv: initial(conv, NEW_ID, "payroll2"))
    for e in (same_id, other_id):
        assert "403" in str(e), e
        for secret in ("Finance", v2.fqdn, "vmhost2", "exists", "pending", "progress"):
            assert secret not in str(e), (secret, e)
    assert PAYROLL not in str(other_id)  # the id vmhost2 bound is not handed out by a name
    assert snapshot(v1) == before
    owners = [ev for ev in v1.events("admission.refused") if ev.get("peer") == v3.fqdn]
    assert len(owners) == 2 and all(ev["owner"] == v2.fqdn and ev["owner_group"] == "Finance" for ev in owners)

    done = converse(c, v2, v1, lambda conv: initial(conv, PAYROLL, "payroll2"))
    assert not isinstance(done, Exception), done
    got = v1.json("replication", "get", "payroll2")
    assert got["primary_server"] == v2.fqdn and got["applied_sequence"] == 1
    assert v1.json("vm", "get", "payroll2")["id"] == PAYROLL


def test_another_groups_vm_name_is_not_revealed(three):
    """vmhost3 names its new VM like Finance's `ledger`: the refusal (403) reads exactly
    like the one for an id it does not own — no "already exists", no owner, no id."""
    c, v1, v2, v3 = three
    ledger_id = v2.json("vm", "get", "ledger")["id"]
    before = snapshot(v1)
    by_name = forge(c, v1, lambda conv: initial(conv, NEW_ID, "ledger", size=4 * MiB))
    by_id = forge(c, v1, lambda conv: initial(conv, ledger_id, "mine", size=4 * MiB))
    assert "403" in str(by_name) and "403" in str(by_id), (by_name, by_id)
    generic = lambda e, name, vm_id: str(e).replace(name, "NAME").replace(vm_id, "ID")  # noqa: E731
    assert generic(by_name, "ledger", NEW_ID) == generic(by_id, "mine", ledger_id)
    for secret in ("Finance", v2.fqdn, "exists", ledger_id):
        assert secret not in str(by_name), (secret, by_name)
    assert snapshot(v1) == before
    assert len([ev for ev in v1.events("admission.refused") if ev.get("peer") == v3.fqdn]) == 2


# --- item 7: map and disk-size amplification ----------------------------------------------
GiB = 1 << 30
EMPTY = "0f0e0d0c-0000-4000-8000-0000000000dd"


def allocated(root: Path) -> int:
    """Bytes the filesystem really holds for everything under ``root``."""
    return sum(p.lstat().st_blocks * 512 for p in [root, *root.rglob("*")])


def empty_initial(conv, vm_id: str, name: str, *sizes: int, epoch: str = "a" * 16):
    """The review's 287-byte initial: a header declaring empty disks, and a trailer."""
    h = Header(vm_id, name, epoch, 1, 0, "initial", "t", "crash",
               tuple(DiskInfo(i, f"d{i}.img", n) for i, n in enumerate(sizes)))
    return conv.push_log(vm_id, 1, body(log_bytes(h, conv)))


def test_digests_of_never_written_regions_cost_nothing_to_store(shared, tmp_path):
    """A 64 GiB disk nobody wrote, then one digests request: the answer is whole (136 MiB
    of digests, streamed), and the replica keeps nothing of it — the map used to stay."""
    c, v1, _, v3 = shared
    ack = converse(c, v3, v1, lambda conv: empty_initial(conv, EMPTY, "empty", 64 * GiB))
    assert not isinstance(ack, Exception), ack
    vmdir = Path(v1.json("vm", "get", "empty")["disks"][0]["path"]).parents[1]
    held = allocated(vmdir)

    limit = map_bytes(64 * GiB)  # what the primary's own 64 GiB file could make it
    got = converse(c, v3, v1, lambda conv: conv.fetch_digests(EMPTY, tmp_path / "maps", [limit]))
    assert not isinstance(got, Exception), got
    meta, maps = got
    blocks = 64 * GiB // 4096
    assert meta["sizes"] == [64 + 8 * (blocks + blocks // 16)] and maps[0].stat().st_size == meta["sizes"][0]
    assert allocated(vmdir) - held < (1 << 20), f"{allocated(vmdir) - held} bytes kept after a digests answer"
    # what stays besides the copy: the digests recorded at commit for `verify --at-rest`
    # (replica/at_rest.py), a sparse map: the never-written disk's cost nothing either
    assert not [p for p in vmdir.rglob("*") if p.is_file() and p.parent.name not in ("disks", "at-rest")], \
        list(vmdir.rglob("*"))
    assert allocated(vmdir / "at-rest") < (1 << 20), f"{allocated(vmdir / 'at-rest')} bytes of at-rest digests"


@pytest.mark.slow  # long: `make test-slow` (.ci/run runs it); README, Development
def test_entry_quotas_are_enforced_before_anything_is_written(three):
    """`auth-entry set --max-disk-size 1GiB --max-storage 2GiB` for vmhost3: a disk over
    the size, a VM past the storage, a delta growing a disk past either — each refused
    before a byte is written, the log line naming the peer and the quota."""
    c, v1, _, v3 = three
    v1.cli("auth-entry", "set", "--primary", v3.fqdn, "--max-disk-size", "1GiB", "--max-storage", "2GiB")
    entry = next(e for e in v1.json("auth-entry", "list") if e["primary"] == v3.fqdn)
    assert entry["max_disk_size"] == GiB and entry["max_storage"] == 2 * GiB

    before = snapshot(v1)
    e = forge(c, v1, lambda conv: empty_initial(conv, EMPTY, "big", 16 << 40))  # the review's 16 TiB
    assert "403" in str(e) and "max-disk-size" in str(e), e
    e = forge(c, v1, lambda conv: empty_initial(conv, EMPTY, "big", GiB, GiB, GiB))  # each fits, not together
    assert "403" in str(e) and "max-storage" in str(e), e
    assert snapshot(v1) == before

    q1, q2, q3 = (f"0f0e0d0c-0000-4000-8000-0000000001{i}0" for i in range(3))
    for vm_id, name in ((q1, "q1"), (q2, "q2")):
        ack = converse(c, v3, v1, lambda conv: empty_initial(conv, vm_id, name, GiB))
        assert not isinstance(ack, Exception), ack
    before = snapshot(v1)
    e = forge(c, v1, lambda conv: empty_initial(conv, q3, "q3", 4096))  # a third VM: past 2 GiB
    assert "403" in str(e) and "max-storage" in str(e), e

    def grow(conv):  # q1's next delta declares its disk 1 GiB + 4 KiB
        h = Header(q1, "q1", "a" * 16, 2, 1, "delta", "t", "crash", (DiskInfo(0, "d0.img", GiB + 4096),))
        enc = LogEncoder(h, mac_key=conv.mac_key)
        return conv.push_log(q1, 2, body(enc.start() + enc.resize(0, GiB + 4096) + enc.finish()))
    e = forge(c, v1, grow)
    assert "403" in str(e) and "max-disk-size" in str(e), e
    assert snapshot(v1) == before
    refusals = [ev for ev in v1.events("quota.refused") if ev.get("peer") == v3.fqdn]
    assert len(refusals) == 4 and {ev["quota"] for ev in refusals} == {"max-disk-size", "max-storage"}

    v1.cli("auth-entry", "set", "--primary", v3.fqdn, "--max-storage", "none")  # lifted: q3 fits now
    ack = converse(c, v3, v1, lambda conv: empty_initial(conv, q3, "q3", 4096))
    assert not isinstance(ack, Exception), ack


# --- item 6: undo amplification -----------------------------------------------------------
AMP = "0f0e0d0c-0000-4000-8000-0000000000ee"


def amp_log(conv, seq: int, records, *, history: int = 24):
    """Log ``seq`` of vmhost3's own VM `amp` (one 32 MiB disk), asking for ``history``
    recovery points; ``records(enc)`` yields its records."""
    kind, base = ("initial", 0) if seq == 1 else ("delta", seq - 1)
    h = Header(AMP, "amp", "b" * 16, seq, base, kind, f"2026-11-29T00:00:{seq:02d}Z", "crash",
               (DiskInfo(0, "amp.img", 32 * MiB),), history=(history, 1))
    enc = LogEncoder(h, mac_key=conv.mac_key)

    async def gen():
        yield enc.start()
        for r in records(enc):
            yield r
        yield enc.finish()
    return conv.push_log(AMP, seq, gen())


def test_undo_holds_each_old_byte_once_and_history_is_capped(three):
    """The review's 2,119-byte delta: 40 zero records each covering the whole disk made the
    undo log hold the disk's old contents 40 times (1.28 GiB for 32 MiB). Now a cycle's
    undo holds each old byte once, bounded by what the disk holds; and the recovery history
    a primary asks for is capped by `server set --max-recovery-history`."""
    c, v1, _, v3 = three
    old = os.urandom(8 * MiB)  # incompressible: the undo cannot hide its size by compressing it
    ack = converse(c, v3, v1, lambda conv: amp_log(conv, 1, lambda enc: (
        enc.data(0, off, old[off:off + 4 * MiB]) for off in range(0, len(old), 4 * MiB))))
    assert not isinstance(ack, Exception), ack
    disk = Path(v1.json("vm", "get", "amp")["disks"][0]["path"])
    undo = disk.parents[1] / "undo"
    ack = converse(c, v3, v1, lambda conv: amp_log(conv, 2, lambda enc: (enc.zero(0, 0, 32 * MiB)
                                                                        for _ in range(40))))
    assert not isinstance(ack, Exception), ack
    wait_for(lambda: v1.json("replication", "get", "amp")["applied_sequence"] == 2, 60, "the delta applied")
    kept = sum(p.stat().st_size for p in undo.iterdir())
    assert kept <= disk.stat().st_blocks * 512 + len(old) + (1 << 20), f"{kept} bytes of undo for 8 MiB of data"
    assert kept < 10 * MiB, f"{kept} bytes of undo for 8 MiB of data"  # it was 40 x 8 MiB

    v1.cli("server", "set", "--max-recovery-history", "2")
    assert v1.json("server", "get")["max_recovery_history"] == 2
    for seq in range(3, 8):  # five more cycles, each asking for 24 points, a point interval apart
        ack = converse(c, v3, v1, lambda conv: amp_log(conv, seq, lambda enc: [enc.data(0, seq * 4096, b"x" * 4096)]))
        assert not isinstance(ack, Exception), ack
        wait_for(lambda: v1.json("replication", "get", "amp")["applied_sequence"] == seq, 60, f"log {seq} applied")
        applied = time.monotonic()
        wait_for(lambda: time.monotonic() - applied > 1.1, 5, "the 1 s recovery-point interval to pass")
    assert v1.json("replication", "get", "amp")["recovery_history"] == 2
    assert len(v1.json("replication", "recovery-points", "amp")) == 3  # the latest and two older
    assert len(list(undo.iterdir())) == 2
    capped = [ev for ev in v1.events("recovery.history_capped") if ev.get("peer") == v3.fqdn]
    assert capped and capped[-1]["asked"] == 24 and capped[-1]["kept"] == 2


# --- also checked: seed adoption (`start-initial --use-existing`) -------------------------
@pytest.fixture
def seeding(tmp_path):
    """vmhost1 a replica server for any host (token), vmhost2 a primary with VM `seeded`
    whose copy the replica's operator put in <storage>/seeded/ — or so it seems."""
    c = Cluster(tmp_path, names=("vmhost1", "vmhost2"))
    v1, v2 = c["vmhost1"], c["vmhost2"]
    v1.start()
    v2.start()
    v1.cli("server", "set", "--enabled", "true")
    image = tmp_path / "seeded.img"
    make_sparse_image(image, 8 * MiB, data_pieces=4)
    v2.cli("vm", "add", "seeded", "--disk", str(image))
    v2.cli("replication", "enable", "seeded", "--replica-server", v1.fqdn, "--replica-port", str(v1.port),
           "--frequency", "3600")
    seed = Path(v1.json("server", "get")["default_storage"]) / "seeded"
    seed.mkdir(parents=True)
    yield v1, v2, image, seed
    c.shutdown()


@pytest.mark.slow  # long: `make test-slow` (.ci/run runs it); README, Development
@pytest.mark.parametrize("trap", ["hard-link", "foreign-owner", "symlink"])
def test_seed_adoption_takes_only_a_file_nobody_else_can_reach(seeding, tmp_path, trap):
    """Adoption renames the seed's files into the replica's private folder, and the resync
    then writes into them. A file with another hard link (e.g. to a file of this host), one
    another user owns (who may hold it open), or a symbolic link would let the replica write
    — or someone else read and write — outside its copy. Refused, naming the file."""
    v1, v2, image, seed = seeding
    victim = tmp_path / "victim.img"
    victim.write_bytes(image.read_bytes()[:4 * MiB])  # something the copy's resync would overwrite
    before = victim.read_bytes()
    if trap == "hard-link":
        os.link(victim, seed / "seeded.img")
    elif trap == "symlink":
        (seed / "seeded.img").symlink_to(victim)
    else:
        if os.geteuid() != 0:
            pytest.skip("needs root to give a file to another user")
        (seed / "seeded.img").write_bytes(image.read_bytes())
        os.chown(seed / "seeded.img", 65534, 65534)
    r = v2.cli("replication", "start-initial", "seeded", "--use-existing", "--wait", check=False)
    assert r.returncode == 1 and str(seed / "seeded.img") in r.stderr and "not adopted" in r.stderr, r.stderr
    assert victim.read_bytes() == before
    assert v1.json("vm", "list") == []
    assert (seed / "seeded.img").exists() or (seed / "seeded.img").is_symlink()  # left where it was
    refused = [e for e in v1.events("seed.refused") if e.get("peer") == v2.fqdn]
    assert refused and str(seed / "seeded.img") in refused[-1]["file"]


# --- also checked: what a replicated file makes the replica touch after a failover ----------
def test_a_replicated_qcow2_cannot_point_the_failed_over_vm_at_a_file_of_the_replica(seeding, tmp_path):
    """The primary's own disk is the primary's to write: after `vm add`, its qcow2 header
    can be rewritten to name /etc/shadow as backing file, and the next cycle carries those
    bytes to the replica. After a failover there, `vm start` (whose hook starts the
    hypervisor, which follows backing files) is refused naming the file, and the hook does
    not run; nothing else of the primary's — its hooks — ever travels."""
    v1, v2, _, _ = seeding
    disk = tmp_path / "web.qcow2"
    head = b"QFI\xfb" + (3).to_bytes(4, "big") + bytes(12)  # qcow2 v3, no backing file
    disk.write_bytes(head.ljust(1 * MiB, b"\0"))
    v2.cli("vm", "add", "web", "--disk", str(disk))
    v2.cli("vm", "set", "web", "--on-start", f"touch {tmp_path / 'primary-hook-ran'}")
    v2.cli("replication", "enable", "web", "--replica-server", v1.fqdn, "--replica-port", str(v1.port),
           "--frequency", "3600")
    v2.json("replication", "start-initial", "web", "--wait")
    name = b"/etc/shadow"  # the primary rewrites its own header
    with open(disk, "r+b") as f:
        f.write(b"QFI\xfb" + (3).to_bytes(4, "big") + (512).to_bytes(8, "big") + len(name).to_bytes(4, "big"))
        f.seek(512)
        f.write(name)
    v2.json("replication", "sync", "web", "--wait")
    wait_for(lambda: v1.json("replication", "get", "web")["applied_sequence"] == 2, 60, "the cycle applied")

    marker = tmp_path / "replica-hook-ran"
    v1.json("failover", "start", "web")
    assert v1.json("vm", "get", "web")["hooks"] == {}  # the primary's hooks stayed on the primary
    v1.cli("vm", "set", "web", "--on-start", f"touch {marker}")
    r = v1.cli("vm", "start", "web", check=False)
    assert r.returncode == 1 and "/etc/shadow" in r.stderr and "web.qcow2" in r.stderr, r.stderr
    assert not marker.exists() and not (tmp_path / "primary-hook-ran").exists()
    assert v1.json("vm", "get", "web")["state"] != "Running"
    assert [e for e in v1.events("vm.backing_refused") if e.get("vm") == "web"]

"""A broken connection in the middle of an initial copy (issue 6, scenario 3): the next
attempt continues from the replica's durable offset instead of starting over, the resume
state belongs to the VM, the log and the peer that sent it, and a resync then makes the
copy consistent (blocks of the resumed copy were read at two different times)."""

import asyncio
import os
from pathlib import Path

import pytest

from tests.integration.harness import file_digest, free_port, wait_applied, wait_for

from .linkproxy import LinkProxy

pytestmark = pytest.mark.integration
MiB = 1 << 20
DATA = 1024 * MiB  # the issue asks for a cut in the middle of a 1 GiB initial replication


def random_image(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        for _ in range(size // (8 * MiB)):
            f.write(os.urandom(8 * MiB))


@pytest.mark.slow  # long: `make test-slow` (.ci/run runs it); README, Development
def test_a_cut_initial_copy_resumes_from_the_durable_offset(token_pair, tmp_path):
    primary, replica = token_pair
    image = tmp_path / "big.img"
    random_image(image, DATA)
    port = free_port(replica.addr)
    with LinkProxy((replica.addr, port), (replica.addr, replica.port)) as link:
        primary.cli("vm", "add", "big", "--disk", str(image))
        primary.cli("replication", "enable", "big", "--replica-server", replica.fqdn, "--replica-port", str(port),
                    "--auth", "token", "--frequency", "3600")
        link.cut_after = 600 * MiB  # the link breaks in the middle of the copy
        link.down = False
        primary.cli("replication", "start-initial", "big")
        wait_for(lambda: link.cuts == 1, 60, "the cut")
        link.down = True  # and stays down a moment: the primary keeps retrying meanwhile
        first = link.up_bytes
        wait_for(lambda: primary.events("cycle.failed"), 30, "the failed attempt")
        interrupted = wait_for(lambda: replica.events("initial.interrupted"), 30, "the replica's durable progress")
        durable = interrupted[-1]["progress"]["offset"]
        assert 500 * MiB <= durable <= 600 * MiB

        # another authenticated host (even of the same trust group) can neither see nor use that
        # progress: the pending copy's id is vmhost2's (replica/admission.py)
        intruder = replica.cluster["vmhost3"]
        intruder.start()
        vm_id = primary.json("vm", "get", "big")["id"]
        got = forged_resume(intruder, replica, vm_id, interrupted[-1]["progress"]["epoch"], durable)
        assert got["status"].startswith("403") and "belongs to another primary" in got["status"], got
        assert got["push"].startswith("403") and "belongs to another primary" in got["push"], got
        assert len([e for e in replica.events("admission.refused") if e.get("peer") == intruder.fqdn]) == 2

        link.down = False
        wait_for(lambda: primary.events("initial.resumed"), 90, "the resumed copy")
        wait_for(lambda: primary.json("replication", "get", "big")["state"] == "Replicating", 90,
                 "the resync after the resumed copy")
    resumed = primary.events("initial.resumed")[-1]
    assert resumed["offset"] >= durable - (64 << 10)
    total = link.up_bytes
    print(f"{total / DATA:.3f} x the data crossed the link (durable offset {durable / MiB:.0f} MiB)")
    assert total < 1.1 * DATA, f"{total / MiB:.0f} MiB crossed the link for {DATA / MiB:.0f} MiB of data"
    assert first < total  # the resumed part went through the link too
    done = primary.events("resync.done")[-1]
    assert done["differing_bytes"] == 0  # nothing changed between the attempts: nothing to fix
    wait_applied(primary, replica, "big")
    copy = Path(replica.json("vm", "get", "big")["disks"][0]["path"])
    assert file_digest(copy) == file_digest(image)


def forged_resume(intruder, replica, vm_id: str, epoch: str, offset: int) -> dict:
    """vmhost3, authenticated in the same realm, asks for the progress and sends a log that
    claims to resume the copy vmhost2 was sending."""
    from replicad.auth.token import Credential, RealmPublic
    from replicad.transport.client import PeerClient
    from replicad.wire import DiskInfo, Header, LogEncoder

    async def run() -> dict:
        cred = Credential.load(intruder.root / f"{intruder.fqdn}.cred")
        realm = RealmPublic.load(intruder.cluster.root / "realm" / "realm.pub")
        client = PeerClient(cred, realm, None, {replica.fqdn: replica.addr})
        out: dict = {"status": None, "push": ""}
        try:
            async with client.conversation(replica.fqdn, replica.port, "token") as conv:
                try:
                    out["status"] = str(await conv.replica_status(vm_id))
                except Exception as e:  # noqa: BLE001 — the refusal is what we look at
                    out["status"] = _refusal(e)
            async with client.conversation(replica.fqdn, replica.port, "token") as conv:
                h = Header(vm_id, "big", epoch, 1, 0, "initial", "t", "crash", (DiskInfo(0, "big.img", DATA),),
                           resume=(0, offset))
                enc = LogEncoder(h, compress=False, mac_key=conv.mac_key)
                raw = enc.start() + enc.data(0, offset, b"X" * 4096) + enc.finish()

                async def body():
                    yield raw
                try:
                    await conv.push_log(vm_id, 1, body())
                except Exception as e:  # noqa: BLE001 — the refusal is what we look at
                    out["push"] = _refusal(e)
        finally:
            await client.close()
        return out
    return asyncio.run(run())


def _refusal(e: Exception) -> str:
    """"403 <message>" from a PeerError's text ("… answered 403: <message>")."""
    text = str(e)
    for status in ("403", "409"):
        if f"answered {status}" in text:
            return f"{status} {text}"
    return text

"""`replication verify` (issue 20, item 1) with both daemons in the test's process: bytes
flipped in the replica's copy behind replicad's back (its mtime and size kept) are found,
exactly those blocks; `--repair` ships only them; a second verify is clean. The same story
through the real CLI and the metrics endpoint is tests/integration/test_verify.py."""

import asyncio
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ..integration.harness import file_digest
from ..integration.images import make_sparse_image, scribble
from .daemons import ApiFailed, until
from .test_pair import applied, enable, replica_disk

MiB = 1 << 20
BLOCK = 4096


def flip(path: Path, blocks: list[int]) -> None:
    """Invert one byte in each of these 4 KiB blocks, keeping the file's size and mtime: a
    disk that lies, or bit rot, as replicad's identity check cannot see it."""
    st = os.stat(path)
    with open(path, "r+b") as f:
        for b in blocks:
            f.seek(b * BLOCK + 123)
            byte = f.read(1)
            f.seek(b * BLOCK + 123)
            f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_size == st.st_size and os.stat(path).st_mtime_ns == st.st_mtime_ns


async def replicating(primary, replica, name: str, tmp_path: Path) -> Path:
    image = tmp_path / f"{name}.img"
    make_sparse_image(image, 4 * MiB, data_pieces=4)
    await enable(primary, replica, name, image)
    await primary.api("POST", f"/v1/replications/{name}/start-initial", {"wait": True})
    await applied(primary, replica, name)
    return image


async def test_verify_finds_exactly_the_flipped_blocks_and_repair_ships_only_them(pair, tmp_path):
    primary, replica = pair
    image = await replicating(primary, replica, "web", tmp_path)
    clean = await primary.api("POST", "/v1/replications/web/verify", {"wait": True})
    assert clean["mismatches"] == 0 and clean["compared"] == 4 * MiB // BLOCK and clean["point"] == 1

    copy = await replica_disk(replica, "web")
    flip(copy, [3, 520, 521])  # blocks holding data (a flipped hole would be repaired as zeros)
    found = await primary.api("POST", "/v1/replications/web/verify", {"wait": True})
    assert found["mismatches"] == 3
    assert found["blocks"] == [{"file": "web.img", "blocks": [[3, 3], [520, 521]]}]
    assert "repair" not in found  # nothing shipped without --repair
    measured = await primary.api("GET", "/v1/replications/web/measure")
    assert measured["verify_mismatches"] == 3 and measured["verify_point"] == 1
    assert measured["health"] == "Critical"
    assert any("web.img: 3, 520-521" in r for r in measured["health_reasons"]), measured["health_reasons"]
    assert measured["last_clean_verify_time"] == clean_time(measured)

    repaired = await primary.api("POST", "/v1/replications/web/verify", {"repair": True, "wait": True})
    assert repaired["mismatches"] == 3
    assert repaired["repair"]["kind"] == "resync"
    assert repaired["repair"]["data_bytes"] == 3 * BLOCK  # only those blocks
    await applied(primary, replica, "web")
    assert file_digest(copy) == file_digest(image)

    again = await primary.api("POST", "/v1/replications/web/verify", {"wait": True})
    assert again["mismatches"] == 0 and again["point"] == 2
    measured = await primary.api("GET", "/v1/replications/web/measure")
    assert measured["health"] == "Normal", measured["health_reasons"]


def clean_time(measured: dict) -> str:
    assert measured["last_clean_verify_time"] is not None
    return measured["last_clean_verify_time"]


async def test_verify_reads_at_its_rate_and_cycles_wait_for_it(pair, tmp_path):
    """`--verify-rate` bounds how fast the replica reads its copy; a cycle asked for while a
    verify runs waits for it, so the point compared does not move under it."""
    primary, replica = pair
    image = await replicating(primary, replica, "db", tmp_path)  # the copy holds 1 MiB of data to read
    await primary.api("PATCH", "/v1/replications/db", {"verify_rate": "1MiB"})
    assert (await primary.api("GET", "/v1/replications/db"))["verify_rate"] == MiB
    verify = asyncio.create_task(primary.api("POST", "/v1/replications/db/verify", {"wait": True}))

    async def running():
        return primary.host.primary.cycle_lock(primary.host.catalog.vm_by_name("db").id).locked()
    await until(running, what="the verify to hold the VM's cycles")
    with pytest.raises(ApiFailed, match="already running"):
        await primary.api("POST", "/v1/replications/db/verify", {})
    scribble(image, 3, seed=5)
    sync = asyncio.create_task(primary.api("POST", "/v1/replications/db/sync", {"wait": True}))
    done, _ = await asyncio.wait({verify, sync}, return_when=asyncio.FIRST_COMPLETED)
    assert done == {verify}  # the cycle waited
    result = verify.result()
    assert result["point"] == 1 and result["mismatches"] == 0
    assert result["seconds"] >= 0.95  # 1 MiB read at 1 MiB/s
    assert (await sync)["seq"] == 2


async def test_verify_is_refused_where_there_is_no_point_to_compare(pair, tmp_path):
    primary, replica = pair
    image = tmp_path / "app.img"
    make_sparse_image(image, MiB, data_pieces=1)
    await enable(primary, replica, "app", image)
    with pytest.raises(ApiFailed, match="cannot be verified in state ReadyForInitialReplication") as e:
        await primary.api("POST", "/v1/replications/app/verify", {"wait": True})
    assert e.value.status == 409
    await primary.api("POST", "/v1/replications/app/start-initial", {"wait": True})
    await applied(primary, replica, "app")
    with pytest.raises(ApiFailed, match="app is a replica here"):
        await replica.api("POST", "/v1/replications/app/verify", {})


async def test_a_scheduled_verify_runs_by_itself_in_its_window(pair, tmp_path):
    primary, replica = pair
    await replicating(primary, replica, "mail", tmp_path)
    got = await primary.api("PATCH", "/v1/replications/mail", {"verify_every": "1h"})
    assert got["verify_every"] == "1h" and got["next_verify_time"] is not None

    async def verified():
        m = await primary.api("GET", "/v1/replications/mail/measure")
        return m["last_clean_verify_time"] and m
    first = await until(verified, what="the scheduled verify (due at once: never verified)")
    assert first["verify_mismatches"] == 0 and first["verify_blocks_compared"] == 4 * MiB // BLOCK
    after = await primary.api("GET", "/v1/replications/mail")
    assert after["next_verify_time"] > first["last_verify_time"]  # an hour after it

    now = datetime.now(UTC)
    opens = now + timedelta(hours=2)
    window = f"{opens:%H:%M}-{opens + timedelta(hours=1):%H:%M}"
    got = await primary.api("PATCH", "/v1/replications/mail", {"verify_every": "1s", "verify_window": window})
    assert got["verify_window"] == window
    assert got["next_verify_time"] == f"{opens:%Y-%m-%dT%H:%M}:00Z"  # due now, but the window is closed
    with pytest.raises(ApiFailed, match="HH:MM-HH:MM"):
        await primary.api("PATCH", "/v1/replications/mail", {"verify_window": "25:00-26:00"})


async def test_verify_at_rest_checks_the_copy_and_undo_logs_against_digests_recorded_at_commit(pair, tmp_path):
    """`--at-rest` on the replica, without the primary: the digests recorded at each commit
    (the whole copy after the initial copy, then only what each log wrote) match the copy;
    bytes flipped behind replicad's back are found, exactly those blocks, and so is a
    damaged undo log; after the primary's `--repair` (a resync, a new chain) it is clean."""
    primary, replica = pair
    image = await replicating(primary, replica, "app", tmp_path)
    at_rest = {"at_rest": True, "wait": True}
    first = await replica.api("POST", "/v1/replications/app/verify", at_rest)
    assert (first["point"], first["mismatches"], first["undo_damaged"]) == (1, 0, [])
    await primary.api("PATCH", "/v1/replications/app", {"recovery_history": 2})  # undo logs are kept
    copy = await replica_disk(replica, "app")
    for seed in (7, 8):
        scribble(image, 40, seed=seed)
        await primary.api("POST", "/v1/replications/app/sync", {"wait": True})
        await applied(primary, replica, "app")
        if seed == 7:
            clean = await replica.api("POST", "/v1/replications/app/verify", {**at_rest, "verify_rate": "64MB"})
            assert (clean["point"], clean["mismatches"], clean["undo_damaged"]) == (2, 0, [])  # updated in place
            flip(copy, [3])  # before the next commit: it records what that log wrote, not the whole copy
    flip(copy, [520, 521])
    undo = next(iter(sorted((copy.parent.parent / "undo").glob("*.undo"))))
    raw = bytearray(undo.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    undo.write_bytes(bytes(raw))
    found = await replica.api("POST", "/v1/replications/app/verify", at_rest)
    assert found["blocks"] == [{"file": "app.img", "blocks": [[3, 3], [520, 521]]}]
    assert [d.split(":")[0] for d in found["undo_damaged"]] == [undo.name]
    measured = await replica.api("GET", "/v1/replications/app/measure")
    assert measured["health"] == "Critical" and measured["verify_at_rest"] is True
    assert any("app.img: 3, 520-521" in r for r in measured["health_reasons"])
    assert any(undo.name in r for r in measured["health_reasons"])
    with pytest.raises(ApiFailed, match="run it there"):
        await replica.api("POST", "/v1/replications/app/verify", {**at_rest, "repair": True})
    with pytest.raises(ApiFailed, match="is a primary here"):
        await primary.api("POST", "/v1/replications/app/verify", at_rest)

    repaired = await primary.api("POST", "/v1/replications/app/verify", {"repair": True, "wait": True})
    assert repaired["blocks"] == found["blocks"] and repaired["repair"]["data_bytes"] == 3 * BLOCK
    await applied(primary, replica, "app")
    again = await replica.api("POST", "/v1/replications/app/verify", at_rest)
    assert (again["point"], again["mismatches"], again["undo_damaged"]) == (4, 0, [])
    assert (await replica.api("GET", "/v1/replications/app/measure"))["health"] == "Normal"

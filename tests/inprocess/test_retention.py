"""Retention grids (issue 20, item 2) at a 1 s frequency with a grid in seconds, both
daemons in the test's process: the points kept are those zrepl's grid keeps (checked
against a brute-force oracle over every point made, as the replica's commits saw them),
a pinned point stays, and a test failover to each listed point gives the bytes the
image had at that moment. The image is written only by the VM's pre-snapshot hook, just
before each capture: stamp n in block 0 and one more block, so the bytes of stamp n are
known and the stamp read from a failover copy says which capture it is."""

import asyncio
import hashlib
import sys
from pathlib import Path

from replicad.times import parse_time

from ..integration.images import make_sparse_image
from .daemons import until
from .test_pair import applied, enable

MiB = 1 << 20
BLOCK = 4096
GRID = "2x1s | 2x2s | 1x4s"
EDGES = [1, 2, 4, 6, 10]  # the grid's intervals end at these ages (seconds before the newest point)

HOOK = """
import os, sys, time
counter, stamps = sys.argv[1], sys.argv[2]
n = int(open(counter).read()) + 1 if os.path.exists(counter) else 1
with open(os.environ["REPLICAD_DISKS"].split(":")[0], "r+b") as f:
    f.seek(0); f.write(n.to_bytes(8, "little") * 512)
    f.seek((1 + n % 200) * 4096); f.write(bytes([n % 251]) * 4096)
    f.flush(); os.fsync(f.fileno())
open(counter, "w").write(str(n))
open(stamps, "a").write(f"{n} {time.time()}\\n")
"""


def bytes_at(original: bytes, n: int) -> bytes:
    """The image after the hook's first ``n`` runs."""
    img = bytearray(original)
    for k in range(1, n + 1):
        img[0:BLOCK] = k.to_bytes(8, "little") * 512
        at = (1 + k % 200) * BLOCK
        img[at:at + BLOCK] = bytes([k % 251]) * BLOCK
    return bytes(img)


def oracle(made: list[tuple[int, float]], pinned: set[int]) -> list[int]:
    """The points kept after the last commit, by brute force: at each commit, the previous
    newest point joins the kept ones; each is kept when it is pinned, not older than the
    newest point, or the oldest (then lowest) of those whose age falls in the same interval."""
    kept: list[tuple[int, float]] = []
    for i in range(1, len(made)):
        now = made[i][1]
        candidates = kept + [made[i - 1]]

        def bucket(p):
            age = now - p[1]
            return -1 if age <= 0 else next((j for j, e in enumerate(EDGES) if age <= e), None)
        kept = [p for p in candidates if p[0] in pinned or bucket(p) == -1 or (
            bucket(p) is not None and min((q for q in candidates if bucket(q) == bucket(p)),
                                          key=lambda q: (q[1], q[0])) == p)]
    return sorted(p[0] for p in kept)


async def test_a_grid_in_seconds_keeps_its_points_and_each_gives_its_moments_bytes(pair, tmp_path):
    primary, replica = pair
    image = tmp_path / "db.img"
    make_sparse_image(image, MiB, data_pieces=1)
    original = image.read_bytes()
    hook = tmp_path / "hook.py"
    hook.write_text(HOOK)
    counter, stamps = tmp_path / "counter", tmp_path / "stamps"
    await enable(primary, replica, "db", image)
    await primary.api("PATCH", "/v1/vms/db", {"pre_snapshot": f"{sys.executable} {hook} {counter} {stamps}"})
    got = await primary.api("PATCH", "/v1/replications/db", {"frequency": 2, "retention": "2x1s|2x2s|1x4s"})
    assert got["retention"] == GRID and "2x1s" in got["retention_warning"]  # 1 s intervals, a cycle every 2 s
    got = await primary.api("PATCH", "/v1/replications/db", {"frequency": 1})
    assert got["retention_warning"] is None
    made: list[tuple[int, float]] = []  # every point committed: (seq, its time)
    applier = replica.host.replica.applier
    commit = applier.commit

    async def recorded(vm_id, header, *rest):
        made.append((header.seq, parse_time(header.time).timestamp()))
        return await commit(vm_id, header, *rest)
    applier.commit = recorded
    await primary.api("POST", "/v1/replications/db/start-initial", {"wait": True})

    async def listed():
        return await replica.api("GET", "/v1/replications/db/recovery-points")

    async def at_least(n: int):
        return (await replica.api("GET", "/v1/replications/db"))["applied_sequence"] >= n
    await until(lambda: at_least(4), what="point 4 applied")
    pin = int((await listed())[0]["id"])  # the oldest point listed now: pinned, it must outlive the grid
    pinned = await replica.api("POST", f"/v1/replications/db/recovery-points/{pin}/pin")
    assert [p["pinned"] for p in pinned if int(p["id"]) == pin] == [True]
    await until(lambda: at_least(pin + 12), within=30, what="12 more points at a 1 s frequency")
    await primary.api("POST", "/v1/replications/db/suspend")
    await asyncio.sleep(0)
    await applied(primary, replica, "db")

    assert [s for s, _ in made] == list(range(1, len(made) + 1))
    points = await listed()
    newest = made[-1][0]
    assert [int(p["id"]) for p in points] == oracle(made, {pin}) + [newest]
    assert pin in oracle(made, {pin}) and pin not in oracle(made, set())  # the pin kept it
    assert len(points) >= 5

    when = {int(n): float(t) for n, t in (line.split() for line in stamps.read_text().splitlines())}
    for p in points:
        test = await replica.api("POST", "/v1/failover/db/start", {"as_test": True, "recovery_point": p["id"]})
        data = await asyncio.to_thread(Path(test["disks"][0]["path"]).read_bytes)
        n = int.from_bytes(data[:8], "little")
        assert hashlib.sha256(data).digest() == hashlib.sha256(bytes_at(original, n)).digest(), p
        assert 0 <= when[n] - parse_time(p["time"]).timestamp() < 2, (p, n, when[n])  # that moment's stamp
        await replica.api("POST", "/v1/failover/db/stop")
    unpinned = await replica.api("DELETE", f"/v1/replications/db/recovery-points/{pin}/pin")
    assert not any(p["pinned"] for p in unpinned)

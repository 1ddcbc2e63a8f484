"""A full disk under the primary's state dir (issue 6, scenario 6): the cycle fails with a
clear error and Critical health, the digest map of the last acknowledged cycle stays
whole, and once space is freed replication goes on by itself with a delta (no resync, no
full copy)."""

import os

import pytest

from tests.integration.conftest import article_pair
from tests.integration.harness import file_digest, mounted, wait_applied, wait_for
from tests.integration.images import scribble
from tests.integration.test_replication import replicated

pytestmark = pytest.mark.integration
MiB = 1 << 20


def fill(folder) -> int:
    """Fill the filesystem of ``folder`` to the last byte; returns how much was written."""
    n = 0
    with open(folder / "filler", "wb", buffering=0) as f:
        chunk = b"\1" * (64 << 10)
        while True:
            try:
                n += f.write(chunk)
            except OSError:
                if len(chunk) == 1:
                    return n
                chunk = chunk[:len(chunk) // 2]


@pytest.mark.slow  # long: `make test-slow` (.ci/run runs it); README, Development
def test_primary_state_dir_full_then_freed(token_cluster, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    with mounted(tmp_path / "small", "-t", "tmpfs", "-o", "size=8m", "tmpfs") as small:
        token_cluster["vmhost2"].write_config(state_dir=str(small / "state"))
        primary, replica = article_pair(token_cluster)
        image, copy = replicated(primary, replica, "sf", tmp_path, 64 * MiB, 8, frequency=3600)
        maps = sorted((small / "state" / "maps").rglob("*.map"))
        assert maps, "the primary keeps its digest maps in its state dir"

        assert fill(small) > 0
        scribble(image, 500, seed=31)
        r = primary.cli("replication", "sync", "sf", "--wait", check=False)
        assert r.returncode == 1 and "No space left on device" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
        got = primary.json("replication", "get", "sf")
        assert got["health"] == "Critical" and "No space left" in got["error"]
        assert primary.proc.poll() is None, "the daemon must survive a full state dir"
        assert replica.json("replication", "get", "sf")["applied_sequence"] == 1

        (small / "filler").unlink()  # space is back: the primary's own retries get through
        wait_for(lambda: primary.json("replication", "get", "sf")["error"] is None, 90, "the recovery")
        wait_applied(primary, replica, "sf")
        assert file_digest(copy) == file_digest(image)
        done = primary.events("cycle.done")
        assert done[-1]["kind"] == "delta" and 0 < done[-1]["data_bytes"] <= 500 * 4096
        primary.stop()  # the maps are whole: a restart reads them and the next cycle is a delta
        primary.start()
        scribble(image, 10, seed=32)
        assert primary.json("replication", "sync", "sf", "--wait")["kind"] == "delta"
        wait_applied(primary, replica, "sf")
        assert file_digest(copy) == file_digest(image)
        primary.stop()

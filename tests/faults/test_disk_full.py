"""A full disk on the replica's storage (issue 6, scenario 6): a clear error on the primary
and Critical health, the previous point intact and nothing half-written, and replication
recovers by itself once space is freed."""

import os
from pathlib import Path

import pytest

from tests.integration.harness import file_digest, mounted, wait_applied, wait_for
from tests.integration.images import make_sparse_image, scribble

pytestmark = pytest.mark.integration
MiB = 1 << 20


@pytest.fixture
def small_fs(tmp_path):
    """A 48 MiB tmpfs: replica storage that fills up."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    with mounted(tmp_path / "small", "-t", "tmpfs", "-o", "size=48m", "tmpfs") as mnt:
        yield mnt


def test_replica_storage_full_then_freed(token_pair, tmp_path, small_fs):
    primary, replica = token_pair
    storage = small_fs / "replicas"
    replica.cli("auth-entry", "set", "--primary", "*.contoso.com", "--storage", str(storage),
                "--trust-group", "Production")
    image = tmp_path / "full.img"
    make_sparse_image(image, 64 * MiB, data_pieces=32, piece=256 << 10)  # 8 MiB of data
    primary.cli("vm", "add", "full", "--disk", str(image))
    primary.cli("replication", "enable", "full", "--replica-server", replica.fqdn, "--replica-port",
                str(replica.port), "--auth", "token", "--frequency", "3600")
    primary.json("replication", "start-initial", "full", "--wait")
    wait_applied(primary, replica, "full")
    copy = Path(replica.json("vm", "get", "full")["disks"][0]["path"])
    point = file_digest(copy)

    free = os.statvfs(small_fs).f_bavail * os.statvfs(small_fs).f_frsize
    filler = small_fs / "filler"
    with open(filler, "wb") as f:  # leave ~4 MiB: less than the next log needs
        f.write(b"\1" * (free - 4 * MiB))
    scribble(image, 4000, seed=21)  # ~16 MB of changes
    r = primary.cli("replication", "sync", "full", "--wait", check=False)
    assert r.returncode == 1 and "No space left on device" in r.stderr
    got = primary.json("replication", "get", "full")
    assert got["health"] == "Critical" and "No space left" in got["error"]
    assert file_digest(copy) == point  # the previous point is intact
    vmdir = copy.parent.parent
    assert not [p for p in (vmdir / "logs").iterdir()]  # nothing half-written stays behind
    assert replica.json("replication", "get", "full")["applied_sequence"] == 1

    filler.unlink()  # space is freed: the primary's retries get through by themselves
    wait_for(lambda: primary.json("replication", "get", "full")["error"] is None, 90, "the recovery")
    wait_applied(primary, replica, "full")
    assert file_digest(copy) == file_digest(image)
    got = primary.json("replication", "get", "full")
    # the failed attempts were missed cycles: Warning until a new interval starts
    assert got["health"] == "Warning" and any("missed" in r for r in got["health_reasons"])
    primary.json("replication", "reset-stats", "full")
    assert primary.json("replication", "get", "full")["health"] == "Normal"

"""Many VMs on one replica server, one of them broken (issue 6, scenario 8, short form: the
long run is `make bench`), and the bandwidth limit held (scenario 4)."""

import os
import time
from pathlib import Path

import pytest

from tests.integration.harness import file_digest, wait_applied, wait_for
from tests.integration.images import make_sparse_image, scribble

pytestmark = pytest.mark.integration
MiB = 1 << 20


@pytest.mark.slow  # long: `make test-slow` (.ci/run runs it); README, Development
def test_many_vms_every_cycle_accounted_and_one_broken_disk_disturbs_no_one(token_pair, tmp_path):
    primary, replica = token_pair
    names = [f"m{i:02d}" for i in range(12)]
    images = {}
    for i, n in enumerate(names):
        images[n] = tmp_path / f"{n}.img"
        make_sparse_image(images[n], 4 * MiB, data_pieces=4, piece=64 << 10, seed=i)
        primary.cli("vm", "add", n, "--disk", str(images[n]))
        primary.cli("replication", "enable", n, "--replica-server", replica.fqdn, "--replica-port",
                    str(replica.port), "--auth", "token", "--frequency", "2")
        primary.cli("replication", "start-initial", n)
    wait_for(lambda: all(r["state"] == "Replicating" for r in primary.json("replication", "get")), 90,
             "every initial copy")
    for n in names:
        primary.cli("replication", "reset-stats", n)
    images["m00"].unlink()  # one VM's disk disappears
    t0 = time.monotonic()
    deadline = t0 + 12
    while time.monotonic() < deadline:  # the guests write all along
        for n in names[1:]:
            scribble(images[n], 2, seed=int(time.monotonic() * 1000) % 10**6)
        time.sleep(0.5)
    elapsed = time.monotonic() - t0
    broken = primary.json("replication", "get", "m00")
    assert broken["health"] == "Critical" and "m00.img" in broken["error"]
    for n in names[1:]:
        m = primary.json("replication", "measure", n)
        assert m["errors"] == 0 and m["missed_count"] == 0, (n, m)
        assert m["successful_count"] >= int(elapsed // 2) - 1, (n, m)
    for n in names[1:]:
        primary.json("replication", "sync", n, "--wait")
        wait_applied(primary, replica, n)
        copy = Path(replica.json("vm", "get", n)["disks"][0]["path"])
        assert file_digest(copy) == file_digest(images[n]), n  # no cross-talk
    rss = int([ln for ln in Path(f"/proc/{primary.proc.pid}/status").read_text().splitlines()
               if ln.startswith("VmHWM:")][0].split()[1]) // 1024
    assert rss < 150, f"primary peak RSS {rss} MiB"


def test_bandwidth_limit_is_held_within_ten_percent(token_pair, tmp_path):
    primary, replica = token_pair
    image = tmp_path / "paced.img"
    with open(image, "wb") as f:
        f.write(os.urandom(40 * MiB))  # incompressible: the log is as large as the data
    primary.cli("vm", "add", "paced", "--disk", str(image))
    primary.cli("replication", "enable", "paced", "--replica-server", replica.fqdn, "--replica-port",
                str(replica.port), "--auth", "token", "--frequency", "3600", "--bandwidth-limit", "16MB")
    r = primary.json("replication", "start-initial", "paced", "--wait")
    rate = r["bytes_sent"] / r["seconds"]
    assert 0.9 * 16e6 <= rate <= 1.1 * 16e6, f"{rate / 1e6:.1f} MB/s for a 16 MB/s limit"

"""Plain random kills of whole daemons (issue 6, scenarios 1, 2 and 7): SIGKILL of the
replica, of the primary or of both, at a random moment of a bandwidth-paced cycle, round
after round. After each kill, once the replica has recovered and is quiet, its copy must
equal the image as it was at one of the cycles (never a mix); the relationship must come
back by itself, and the changes must cross once: no full copy, no resync.

The seed is printed; REPLICAD_KILL_SEED=N replays a run."""

import os
import random
import subprocess
import time

import pytest

from tests.integration.harness import BIN, file_digest, wait_applied, wait_for
from tests.integration.images import scribble
from tests.integration.test_replication import replicated

pytestmark = pytest.mark.integration
MiB = 1 << 20
ROUNDS = 8
WRITES = 300  # ~1.2 MB a round: about 0.3 s at the 4 MB/s limit, so kills land in every phase


def _quiet(replica, vm: str) -> None:
    """Wait until the replica has applied everything it acknowledged."""
    def done():
        g = replica.json("replication", "get", vm)
        return g["applied_sequence"] == g["sequence"]
    wait_for(done, 60, "the replica to apply what it acknowledged")


@pytest.mark.slow  # long: `make test-slow` (.ci/run runs it); README, Development
def test_random_kills_leave_the_copy_at_a_cycle_boundary(token_pair, tmp_path):
    seed = int(os.environ.get("REPLICAD_KILL_SEED", time.time_ns() % 10**9))
    print(f"REPLICAD_KILL_SEED={seed}")
    rnd = random.Random(seed)
    primary, replica = token_pair
    image, copy = replicated(primary, replica, "rk", tmp_path, 32 * MiB, 8, frequency=3600,
                             bandwidth_limit="4MB")
    states = [file_digest(image)]  # the image at every moment a cycle could capture it
    done_before = len(primary.events("cycle.done"))
    victims = []
    for rnd_no in range(ROUNDS):
        scribble(image, WRITES, seed=seed + rnd_no)
        states.append(file_digest(image))
        sync = subprocess.Popen([str(BIN), "replication", "sync", "rk", "--wait", "--config", str(primary.config)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(rnd.uniform(0.05, 0.6))  # the fault's moment, not a wait for a condition
        victim = rnd.choice(["replica", "primary", "both"])
        victims.append(victim)
        if victim in ("primary", "both"):
            primary.kill()
        if victim in ("replica", "both"):
            replica.kill()
        sync.communicate(timeout=60)
        if victim == "replica":
            primary.cli("replication", "suspend", "rk")  # keep the replica quiet while it is checked
            replica.start()
        elif victim == "both":
            replica.start()
        _quiet(replica, "rk")
        at = file_digest(copy)
        assert at in states, f"round {rnd_no} ({victim}, seed {seed}): copy between cycles"
        print(f"round {rnd_no}: {victim} killed, copy at cycle state {states.index(at)} of {len(states) - 1}")
        if victim == "replica":
            primary.cli("replication", "resume", "rk")
        else:
            primary.start()
        # the relationship comes back by itself: the next sync completes and the copies match
        assert primary.json("replication", "sync", "rk", "--wait")["kind"] == "delta"
        wait_applied(primary, replica, "rk")
        assert file_digest(copy) == file_digest(image), f"round {rnd_no} ({victim}, seed {seed})"
        assert primary.json("replication", "get", "rk")["state"] == "Replicating"

    done = primary.events("cycle.done")[done_before:]
    assert all(e["kind"] == "delta" for e in done), f"seed {seed}: a full copy or resync was needed"
    shipped = sum(e["data_bytes"] for e in done)
    assert shipped <= ROUNDS * WRITES * 4096, f"seed {seed}: changes crossed more than once ({victims})"
    assert not [p for p in (copy.parent.parent / "logs").iterdir()], "a staged log was left behind"

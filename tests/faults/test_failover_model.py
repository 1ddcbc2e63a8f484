"""The failover model (issue 14) over two real daemons: random sequences of guest writes,
cycles, test failovers, failovers to any point and between points, stop, complete, reverse,
resync, suspend/resume, prepare and kill -9 of either daemon, checked after every step
(failover_model.py, failover_steps.py). The seed is printed; REPLICAD_MODEL_SEED=N replays
a run, REPLICAD_MODEL_STEPS=N sets its length."""

import os
import time

import pytest

from tests.integration.harness import Cluster

from .failover_steps import Driver

pytestmark = pytest.mark.integration


def _run(tmp_path, steps: int, seed: int) -> None:
    print(f"REPLICAD_MODEL_SEED={seed} REPLICAD_MODEL_STEPS={steps}")
    cluster = Cluster(tmp_path, names=("vmhost1", "vmhost2"), auth="token")
    try:
        Driver(cluster, tmp_path, seed).run(steps)
    finally:
        cluster.shutdown()


def _seed() -> int:
    return int(os.environ.get("REPLICAD_MODEL_SEED", time.time_ns() % 10**6))


def test_every_listed_point_and_every_failover_keeps_its_promise(tmp_path):
    _run(tmp_path, int(os.environ.get("REPLICAD_MODEL_STEPS", 14)), _seed())


@pytest.mark.slow
@pytest.mark.parametrize("run", range(3))
def test_the_failover_model_over_long_runs(tmp_path, run):
    _run(tmp_path, int(os.environ.get("REPLICAD_MODEL_STEPS", 80)), _seed() + run)

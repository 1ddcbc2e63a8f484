"""The failover model (issue 14) over two real daemons: random sequences of guest writes,
cycles, test failovers, failovers to any point and between points, stop, complete, reverse,
resync, suspend/resume, prepare and kill -9 of either daemon, checked after every step
(failover_model.py, failover_steps.py). The seed is printed; REPLICAD_MODEL_SEED=N replays
a run, REPLICAD_MODEL_STEPS=N sets its length."""

import os

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


def _seed(default: int) -> int:
    """A fixed seed by default, so CI runs the same sequence every time (these passed on
    the fixed code; docs/reliability.md); REPLICAD_MODEL_SEED explores others."""
    return int(os.environ.get("REPLICAD_MODEL_SEED", default))


def test_every_listed_point_and_every_failover_keeps_its_promise(tmp_path):
    _run(tmp_path, int(os.environ.get("REPLICAD_MODEL_STEPS", 14)), _seed(6))


@pytest.mark.slow
@pytest.mark.timeout(1500)  # 40 steps take 500-650 s on 2 cores
@pytest.mark.parametrize("seed", [6, 20])
def test_the_failover_model_over_long_runs(tmp_path, seed):
    _run(tmp_path, int(os.environ.get("REPLICAD_MODEL_STEPS", 40)), _seed(seed))

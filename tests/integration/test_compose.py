"""`make compose-demo` (issue 7): the article's story in three containers, with vmhost1's
container stopped in the middle of a delta and started again; it must end with identical
copies. Runs where a Docker engine answers (it builds its base image locally when no
registry can be reached); skips with the reason otherwise."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _engine() -> str | None:
    if not shutil.which("docker") or not shutil.which("docker-compose"):
        return "docker or docker-compose is not installed"
    r = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        return "`docker info` does not answer (no Docker engine here)"
    have_base = any(subprocess.run(["docker", "image", "inspect", i], capture_output=True).returncode == 0
                    for i in (os.environ.get("BASE_IMAGE", "python:3.11-slim"), "replicad-base:bookworm"))
    if not have_base and os.geteuid() != 0:
        return "no base image here, and building one (debootstrap) needs root"
    return None


@pytest.mark.slow  # long: `make test-slow` (.ci/run runs it); README, Development
def test_compose_demo_ends_with_identical_copies():
    why = _engine()
    if why:
        pytest.skip(why)
    r = subprocess.run([sys.executable, str(ROOT / "docker" / "compose_demo.py")], capture_output=True, text=True,
                       timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "compose-demo: copies identical" in r.stdout
    assert "attempts that failed while vmhost1 was stopped" in r.stdout
    assert "+ initial replication of contoso2 (started now)" in r.stdout  # set up with replicad apply

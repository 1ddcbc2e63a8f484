"""The container files say what operators rely on (issue 7): a BASE_IMAGE build argument
defaulting to an official slim Python, a multi-stage build, a non-root user, a
HEALTHCHECK, and three hosts on a private network with a volume each. The whole compose
demo runs in .ci/run where a Docker engine answers (`make compose-demo`)."""

import subprocess
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_dockerfile():
    lines = [x.strip() for x in (ROOT / "Dockerfile").read_text().splitlines() if x.strip() and not x.startswith("#")]
    assert lines[0] == "ARG BASE_IMAGE=python:3.11-slim"
    froms = [x for x in lines if x.startswith("FROM ")]
    assert froms == ["FROM ${BASE_IMAGE} AS build", "FROM ${BASE_IMAGE}"]
    final = lines[lines.index(froms[1]):]
    assert "USER replicad" in final and final.index("USER replicad") < len(final) - 2
    assert any(x.startswith("HEALTHCHECK") for x in final)
    assert any(x.startswith("COPY --from=build /opt/replicad") for x in final)
    assert ".venv" in (ROOT / ".dockerignore").read_text()


def test_compose_file():
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = doc["services"]
    assert sorted(services) == ["vmhost1", "vmhost2", "vmhost3"]
    volumes = [next(v for v in s["volumes"] if v.endswith(":/var/lib/replicad")) for s in services.values()]
    assert len(set(volumes)) == 3  # each host its own state
    assert doc["networks"]["contoso"]["internal"] is True
    for name, s in services.items():
        assert f"{name}.contoso.com" in s["networks"]["contoso"]["aliases"]


def test_make_dist_builds_a_wheel_without_warnings(tmp_path):
    """`make dist` (README's install) gives a wheel, and the build says nothing about the
    metadata: setuptools warned three times per install about the license table."""
    r = subprocess.run(["make", "-s", "-C", str(ROOT), "dist", f"DIST={tmp_path}"], capture_output=True, text=True,
                       timeout=300)
    if r.returncode and ("No matching distribution" in r.stderr or "Could not find a version" in r.stderr):
        pytest.skip(f"the build backend cannot be fetched here: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "deprecated" not in (r.stdout + r.stderr).lower(), r.stderr[-3000:]
    [wheel] = tmp_path.glob("replicad-*-py3-none-any.whl")
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
        entry = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert "License-Expression: Apache-2.0" in meta
    assert "replicad = replicad.cli.main:main" in entry

"""`replicad demo` runs the article's story end to end and says the copies are identical."""

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from .harness import BIN

pytestmark = pytest.mark.integration


@pytest.mark.slow  # long: `make test-slow` (.ci/run runs it); README, Development
def test_demo_runs_and_copies_are_identical(tmp_path):
    # no --workdir: the demo makes a temp dir, and says it removes it (a short TMPDIR: the
    # hosts' sockets live in it, and a unix socket's path has 107 bytes at most)
    temp = Path(tempfile.mkdtemp(prefix="rdemo"))
    try:
        r = subprocess.run([str(BIN), "demo"], capture_output=True, text=True, timeout=180,
                           env={**os.environ, "TMPDIR": str(temp)})
        left = list(temp.iterdir())
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert left == [] and "removed the demo's files (" in r.stderr, r.stderr[-2000:]
    out = r.stdout
    for expected in ("$ replicad server set --enabled true --auth token --allow-any-server false   # on vmhost2",
                     "--auth certificate   # on vmhost2",
                     "$ replicad auth-entry add --primary vmhost1.contoso.com --trust-group Production   # on vmhost2",
                     "$ replicad replication start-initial contoso2 --wait   # on vmhost2",
                     "$ replicad replication measure contoso2 -o list   # on vmhost2",
                     "contoso2  Off    Replica",
                     "$ replicad failover start contoso2 --as-test   # on vmhost1",
                     "$ replicad failover start contoso2 --prepare   # on vmhost2",
                     "$ replicad replication reverse contoso2   # on vmhost1",
                     "initial copy sent in reverse: 0 bytes",
                     "$ replicad plan failover shop --prepare --wait   # on vmhost2",
                     "$ replicad plan failover shop --wait   # on vmhost1",
                     "$ replicad plan start shop --wait   # on vmhost1"):
        assert expected in out, expected
    assert "copies" in out and "identical" in out.split("copies")[-1]
    assert "Traceback" not in r.stderr
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "something").write_text("x")
    r = subprocess.run([str(BIN), "demo", "--workdir", str(tmp_path / "demo")], capture_output=True, text=True)
    assert r.returncode == 1 and "is not empty" in r.stderr


@pytest.mark.slow  # long: `make test-slow` (.ci/run runs it); README, Development
def test_demo_keep_running_leaves_the_hosts_up_until_sigterm(tmp_path):
    work = tmp_path / "demo"
    demo = subprocess.Popen([str(BIN), "demo", "--workdir", str(work), "--keep-running"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        for line in demo.stdout:  # the story, then the instructions
            if "Press Ctrl-C" in line:
                break
        else:
            raise AssertionError(f"the demo ended without keeping the hosts: {demo.stderr.read()[-2000:]}")
        for host in ("vmhost1", "vmhost2", "vmhost3"):
            r = subprocess.run([str(BIN), "vm", "list", "-o", "json", "--config", str(work / host / "replicad.yaml")],
                               capture_output=True, text=True, timeout=30)
            assert r.returncode == 0, r.stderr
        assert '"contoso2"' in subprocess.run([str(BIN), "replication", "get", "-o", "json", "--config",
                                               str(work / "vmhost1" / "replicad.yaml")],
                                              capture_output=True, text=True, timeout=30).stdout
        demo.terminate()
        assert demo.wait(60) == 0
        r = subprocess.run([str(BIN), "vm", "list", "--config", str(work / "vmhost1" / "replicad.yaml")],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 3  # the hosts were stopped with the demo
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
        demo.stdout.close()
        demo.stderr.close()

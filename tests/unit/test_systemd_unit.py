"""systemd/replicad.service as systemd itself reads it: `systemd-analyze verify` is clean
(with the program path pointed at this checkout's), and `systemd-analyze security` scores
it at most 3.0. Skips where systemd-analyze is missing. (sd_notify against a real datagram
socket: tests/integration/test_operations.py.)"""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "replicad.service"
PROGRAM = "/opt/replicad/bin/replicad"

needs_systemd = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")


def directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", "[")):
            k, v = line.split("=", 1)
            out.setdefault(k.strip(), []).append(v.strip())
    return out


def test_the_unit_says_what_the_daemon_needs():
    d = directives(UNIT.read_text())
    assert d["Type"] == ["notify"] and d["NotifyAccess"] == ["main"]
    assert d["User"] == ["replicad"]
    assert d["StateDirectory"] == ["replicad"] and d["RuntimeDirectory"] == ["replicad"]
    assert d["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    assert d["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
    assert d["ExecStartPre"] == [f"{PROGRAM} config check --config /etc/replicad/replicad.yaml"]
    assert d["ExecStart"] == [f"{PROGRAM} daemon --config /etc/replicad/replicad.yaml"]
    assert d["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert "WatchdogSec" in d
    # the shipped configs put socket and state where the unit gives them (by default)
    from replicad import config
    for sample in ("token.yaml", "certificate.yaml", "reference.yaml"):
        cfg = config.load(ROOT / "config" / sample, check_files=False)
        assert cfg.state_dir == Path("/var/lib/replicad")
        assert cfg.management.socket == Path("/run/replicad/replicad.sock")


@needs_systemd
def test_systemd_analyze_verify_is_clean(tmp_path):
    program = Path(sys.executable).parent / "replicad"
    unit = tmp_path / "replicad.service"
    unit.write_text(UNIT.read_text().replace(PROGRAM, str(program)))
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and not r.stderr.strip() and not r.stdout.strip(), r.stderr + r.stdout


@needs_systemd
def test_systemd_analyze_security_scores_at_most_3(tmp_path):
    r = subprocess.run(["systemd-analyze", "security", "--offline=true", str(UNIT)], capture_output=True,
                       text=True, timeout=60, cwd=tmp_path)
    m = re.search(r"Overall exposure level for replicad\.service: ([0-9.]+)", r.stdout)
    assert m, r.stdout[-2000:] + r.stderr
    assert float(m.group(1)) <= 3.0, r.stdout[-3000:]

"""What a new operator meets in the first hour (issue 15, item 9): exit codes as the README
says them (1 refused or failed, 2 usage), values written as the CLI writes them (never a
Python repr), `vm remove` saying what became of the files, "no such host" for a name that
does not resolve, and event texts that say what happened."""

import json

import pytest

from .harness import wait_applied
from .images import make_sparse_image

pytestmark = pytest.mark.integration
MiB = 1 << 20


def test_first_hour_messages(token_cluster, tmp_path):
    v1, v2, v3 = token_cluster["vmhost1"], token_cluster["vmhost2"], token_cluster["vmhost3"]
    v1.start()
    v2.start()

    # a missing disk is a failed request (1), a malformed name a usage error (2)
    r = v2.cli("vm", "add", "v", "--disk", str(tmp_path / "nothing.img"), check=False)
    assert r.returncode == 1 and "No such file" in r.stderr, r.stderr
    r = v2.cli("vm", "add", ".v", "--disk", str(tmp_path / "nothing.img"), check=False)
    assert r.returncode == 2, r.stderr

    # a host with no certificate refuses certificate auth: the command was right (exit 1)
    v3.write_config()
    doc = json.loads(v3.config.read_text())
    del doc["listen"]["tls"]
    doc["resolve"][v1.fqdn] = v3.addr  # a sample's resolve map copied as it was: vmhost1 leads to vmhost3
    v3.config.write_text(json.dumps(doc))
    v3.start()
    r = v3.cli("replication", "test-connection", "--replica-server", v1.fqdn, "--replica-port", str(v3.port),
               check=False)
    assert r.returncode == 1, r.stderr
    assert (f"ticket of {v3.fqdn} is for {v1.fqdn}, but this host is {v3.fqdn} (dialled {v3.addr}:{v3.port}, "
            f"{v1.fqdn}'s address in the config's resolve map)") in r.stderr, r.stderr
    image = tmp_path / "v.img"
    make_sparse_image(image, 4 * MiB, data_pieces=1)
    v3.cli("vm", "add", "v", "--disk", str(image))
    r = v3.cli("replication", "enable", "v", "--replica-server", v1.fqdn, "--auth", "certificate", check=False)
    assert r.returncode == 1, r.stderr
    assert "certificate authentication needs a certificate for vmhost3.contoso.com" in r.stderr

    # a name that resolves nowhere
    r = v2.cli("replication", "test-connection", "--replica-server", "vmhost9.contoso.com", check=False)
    assert r.returncode == 1 and "no such host: vmhost9.contoso.com" in r.stderr, r.stderr

    # values as the CLI writes them: plan lines and event lines
    plan = tmp_path / "v1.yaml"
    plan.write_text("server:\n  enabled: true\n  allow_any_server: true\n")
    out = v1.cli("apply", "-f", str(plan), "--diff").stdout
    assert "enabled false → true" in out and "False" not in out, out
    v1.cli("apply", "-f", str(plan))
    v2.cli("vm", "add", "v", "--disk", str(image))
    v2.cli("replication", "enable", "v", "--replica-server", v1.fqdn, "--replica-port", str(v1.port),
           "--frequency", "3600")
    v2.cli("replication", "set", "v", "--frequency", "60", "--compression", "false")
    events = v2.cli("events", "--vm", "v").stdout
    changed = [x for x in events.splitlines() if "replication.changed" in x]
    assert changed and "changes=compression,frequency" in changed[-1] and "[" not in changed[-1], events

    # a resync that finds nothing to do says so
    v2.json("replication", "start-initial", "v", "--wait")
    wait_applied(v2, v1, "v")
    v2.json("replication", "resync", "v", "--wait")
    done = v2.events("resync.done")[-1]
    assert done["differing"] == 0 and "already identical" in done["reason"], done

    # vm remove says what became of the files
    copy = v1.json("vm", "get", "v")["disks"][0]["path"]
    v1.cli("replication", "remove", "v")  # the replica side forgets the relationship, keeps the VM
    out = v1.cli("vm", "remove", "v").stdout
    assert f"v removed from replicad; its files stay where they are: {copy}" in out, out
    v2.cli("replication", "remove", "v")
    out = v2.cli("vm", "remove", "v").stdout
    assert f"its files stay where they are: {image}" in out, out

"""`replicad apply -f FILE` (SPEC §3.6): the article's setup written as two documents,
applied to real daemons: a dry run changes nothing, the apply makes exactly the listed
changes, a second apply changes nothing and says so, edits show as old → new, and bad
documents get one line per error with its YAML path."""

import json

import pytest
import yaml

from ..security.test_local_inputs import qcow2_child
from .harness import Cluster, wait_applied
from .images import make_sparse_image

pytestmark = pytest.mark.integration
MiB = 1 << 20


@pytest.fixture
def hosts(tmp_path):
    c = Cluster(tmp_path / "c", names=("vmhost1", "vmhost2"))
    for h in c.hosts.values():
        h.start()
    yield c["vmhost2"], c["vmhost1"]
    c.shutdown()


def write(path, doc) -> str:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return str(path)


def test_the_article_setup_applied_idempotently(hosts, tmp_path):
    primary, replica = hosts
    replica_doc = write(tmp_path / "vmhost1.yaml", {
        "server": {"enabled": True, "auth": "token", "allow_any_server": False, "monitoring_interval": "720m"},
        "auth_entries": [{"primary": "*.contoso.com", "storage": "replicas", "trust_group": "Production"}]})

    dry = replica.cli("apply", "-f", replica_doc, "--diff").stdout
    assert "~ server: enabled false → true" in dry and "+ auth-entry *.contoso.com" in dry
    assert "nothing was changed" in dry
    assert replica.json("server", "get")["enabled"] is False and replica.json("auth-entry", "list") == []

    out = replica.cli("apply", "-f", replica_doc).stdout
    assert "2 change(s) made" in out
    s = replica.json("server", "get")
    assert s["enabled"] is True and s["allowed_from_any_server"] is False and s["monitoring_interval"] == "12h"
    entry, = replica.json("auth-entry", "list")
    assert entry["storage"] == str(tmp_path / "replicas") and entry["trust_group"] == "Production"
    again = replica.cli("apply", "-f", replica_doc).stdout
    assert again.strip() == f"nothing to change: this host already matches {replica_doc}"

    image = tmp_path / "contoso2.img"
    make_sparse_image(image, 8 * MiB, data_pieces=4)
    primary_doc = {
        "vms": [{"name": "contoso2", "disks": ["contoso2.img"], "pre_snapshot": "true", "post_snapshot": "true"}],
        "replications": [{"vm": "contoso2", "replica_server": replica.fqdn, "replica_port": replica.port,
                          "auth": "token", "frequency": 300, "start_initial": True}]}
    path = write(tmp_path / "vmhost2.yaml", primary_doc)
    plan = json.loads(primary.cli("apply", "-f", path, "--diff", "-o", "json").stdout)
    assert plan["applied"] is False and [c[:2] for c in plan["changes"]] == ["+ ", "~ ", "+ ", "+ "]
    assert primary.json("vm", "list") == []
    primary.cli("apply", "-f", path)
    wait_applied(primary, replica, "contoso2")
    got = primary.json("replication", "get", "contoso2")
    assert got["state"] == "Replicating" and got["frequency"] == 300
    assert primary.json("vm", "get", "contoso2")["hooks"]["pre_snapshot"] == "true"
    assert primary.cli("apply", "-f", path).stdout.startswith("nothing to change")  # no second initial copy

    primary_doc["replications"][0]["frequency"] = 30
    primary_doc["replications"][0]["bandwidth_limit"] = "40MB"
    primary_doc["replications"][0].update(retention="1x1h|24x60m", verify_every="168h", verify_window="01:00-05:00",
                                          auto_resync="window", resync_window="18:30-06:00")
    primary_doc["vms"][0]["hook_timeout"] = 20
    write(tmp_path / "vmhost2.yaml", primary_doc)
    out = primary.cli("apply", "-f", path).stdout
    assert "~ vm contoso2: hook_timeout 300 → 20" in out
    assert "~ replication contoso2: frequency 300 → 30, bandwidth_limit 0 → 40000000" in out
    assert "retention (none) → 1x1h | 24x1h, verify_every (none) → 7d, verify_window (none) → 01:00-05:00" in out
    got = primary.json("replication", "get", "contoso2")
    assert got["frequency"] == 30 and got["bandwidth_limit"] == 40_000_000
    assert (got["retention"], got["verify_every"], got["verify_window"]) == ("1x1h | 24x1h", "7d", "01:00-05:00")
    assert "auto_resync on → window, resync_window (none) → 18:30-06:00" in out  # issue 20 item 4
    assert (got["auto_resync"], got["resync_window"]) == ("window", "18:30-06:00")
    assert primary.cli("apply", "-f", path).stdout.startswith("nothing to change")
    assert primary.json("replication", "get", "contoso2")["sequence"] == 1


def test_bad_documents_get_one_line_per_error_and_change_nothing(hosts, tmp_path):
    primary, replica = hosts
    bad = write(tmp_path / "bad.yaml", {
        "server": {"enabled": "yes", "colour": "blue"},
        "vms": [{"name": "a"}, {"name": "a", "disks": [3]}],
        "replicas": []})
    r = replica.cli("apply", "-f", bad, check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    for needle in ("server.enabled: expected bool, got str", "server.colour: unknown key", "vms[0].disks: required",
                   "vms[1].disks: a list of one or more paths", "vms[1].name: 'a' appears twice",
                   "replicas: unknown section"):
        assert needle in r.stderr, r.stderr
    assert replica.json("server", "get")["enabled"] is False

    (tmp_path / "broken.yaml").write_text("server: [unclosed\n")
    r = replica.cli("apply", "-f", str(tmp_path / "broken.yaml"), check=False)
    assert r.returncode == 2 and "not valid YAML" in r.stderr and len(r.stderr.strip().splitlines()) == 1

    image = tmp_path / "x.img"
    make_sparse_image(image, 4 * MiB, data_pieces=1)
    primary.cli("vm", "add", "x", "--disk", str(image))
    other = write(tmp_path / "other.yaml", {"vms": [{"name": "x", "disks": ["elsewhere.img"]}]})
    r = primary.cli("apply", "-f", other, check=False)
    # a VM's disks: the document's list is its set (issue 20); a disk that is not there is one line
    assert r.returncode == 1 and "elsewhere.img: No such file or directory" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and [d["path"] for d in primary.json("vm", "get", "x")["disks"]] \
        == [str(image)]
    assert len(r.stderr.strip().splitlines()) == 1


def test_a_vms_disk_list_is_its_disk_set_and_backing_files_stay_with_their_disk(hosts, tmp_path):
    """issue 20 item 3: `disks:` names the VM's whole set; what it adds or leaves out is added
    or removed as `vm set --add-disk/--remove-disk` does; a qcow2 disk's backing file, which
    the document does not name, stays."""
    primary, _ = hosts
    images = tmp_path / "images"
    images.mkdir()
    for n in ("a.img", "b.img", "base.img"):
        make_sparse_image(images / n, MiB, data_pieces=1)
    qcow2_child(images / "child.qcow2", "base.img")

    def doc(*disks):
        return write(tmp_path / "vms.yaml", {"vms": [{"name": "files", "disks": [str(images / d) for d in disks]}]})
    primary.cli("apply", "-f", doc("a.img", "child.qcow2"))
    names = [d["path"].rsplit("/", 1)[1] for d in primary.json("vm", "get", "files")["disks"]]
    assert names == ["a.img", "child.qcow2", "base.img"]
    assert "nothing to change" in primary.cli("apply", "-f", doc("a.img", "child.qcow2")).stdout
    dry = primary.cli("apply", "-f", doc("child.qcow2", "b.img"), "--diff").stdout
    assert f"~ vm files: disks +{images / 'b.img'}, -{images / 'a.img'}" in dry, dry
    out = primary.cli("apply", "-f", doc("child.qcow2", "b.img")).stdout
    assert "1 change(s) made" in out, out
    names = [d["path"].rsplit("/", 1)[1] for d in primary.json("vm", "get", "files")["disks"]]
    assert names == ["child.qcow2", "base.img", "b.img"]
    assert "nothing to change" in primary.cli("apply", "-f", doc("child.qcow2", "b.img")).stdout

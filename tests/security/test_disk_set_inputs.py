"""A log that changes a VM's disk set (issue 20 item 3) is input from a peer like any other:
a peer may add disks only inside its own VM's folder. A name that is not a plain file name
is refused by the decoder; a name where something else already sits (a link planted to a
file elsewhere on the replica server) is refused before the log is acknowledged, with a
line naming the peer, and nothing is written through it."""

import json
import os

import pytest

from replicad.errors import WireError
from replicad.replica import disk_set
from replicad.wire import Header

from ..integration.harness import wait_for
from ..integration.images import make_sparse_image
from ..integration.test_replication import replicated
from .helpers import replica_pair

MiB = 1 << 20


@pytest.mark.parametrize("name", ["../escape.img", "/etc/passwd", ".hidden.replicad-held", "a/b.img", ".."])
def test_a_disk_name_that_is_not_a_plain_file_name_is_refused(tmp_path, name):
    doc = {"vm_id": "0f0e0d0c-0000-4000-8000-0000000000bb", "vm_name": "x", "epoch": "e", "seq": 2, "base_seq": 1,
           "kind": "delta", "time": "t", "consistency": "crash",
           "disks": [{"index": 0, "name": "x.img", "size": 4096}, {"index": 1, "name": name, "size": 4096}]}
    with pytest.raises(WireError, match="bad disk entry 1"):
        Header.from_json(json.dumps(doc).encode())
    with pytest.raises(WireError, match="not a plain file name"):
        disk_set.new_path(tmp_path, name)


@pytest.mark.integration
def test_a_disk_added_where_a_link_was_planted_is_refused_and_nothing_is_written_through_it(tmp_path):
    c = replica_pair(tmp_path, "token")
    try:
        replica, primary = c["vmhost1"], c["vmhost2"]
        image, copy = replicated(primary, replica, "db", tmp_path, 4 * MiB, 1, frequency=3600)
        victim = tmp_path / "victim"
        victim.write_bytes(b"replica server's own file\n")
        (copy.parent / "extra.img").symlink_to(victim)  # planted by someone with access to the folder
        extra = tmp_path / "extra.img"
        make_sparse_image(extra, 8 * MiB, data_pieces=2)
        primary.json("vm", "set", "db", "--add-disk", str(extra))
        r = primary.cli("replication", "sync", "db", "--wait", check=False)
        assert r.returncode == 1 and "writes no disk there" in r.stderr, r.stderr
        assert victim.read_bytes() == b"replica server's own file\n"
        assert [d["path"] for d in replica.json("vm", "get", "db")["disks"]] == [str(copy)]
        lines = wait_for(lambda: [e for e in replica.events("log.rejected") if e.get("peer") == primary.fqdn], 10,
                         "the refusal logged with the peer")
        assert "is a symbolic link" in lines[-1]["reason"]
        os.unlink(copy.parent / "extra.img")  # the operator removes it: the next cycle carries the disk
        assert primary.json("replication", "sync", "db", "--wait")["kind"] == "delta"
        wait_for(lambda: len(replica.json("vm", "get", "db")["disks"]) == 2, 30, "the new disk on the replica")
        assert victim.read_bytes() == b"replica server's own file\n"
    finally:
        c.shutdown()

"""`replicad replication verify` through the real CLI, two daemons as processes (issue 20,
item 1): bytes flipped in the replica's copy behind replicad's back (its mtime and size
kept) are found, exactly those blocks, in the command's output, `measure`, health, the
events and the metrics; `--repair` ships only them; a second verify is clean."""

import json

import pytest

from ..inprocess.test_verify import flip
from .conftest import article_pair
from .harness import Cluster, file_digest, wait_applied
from .test_operations import scrape, value, with_metrics
from .test_replication import replicated

pytestmark = pytest.mark.integration
MiB = 1 << 20
BLOCK = 4096


def test_verify_finds_flipped_blocks_repair_ships_them_and_every_view_says_so(tmp_path):
    c = Cluster(tmp_path, names=("vmhost1", "vmhost2"), auth="token")
    try:
        url = with_metrics(c["vmhost2"])
        primary, replica = article_pair(c)
        image, copy = replicated(primary, replica, "contoso2", tmp_path, 8 * MiB, 2, frequency=3600)
        flip(copy, [1, 2, 1025])

        found = primary.json("replication", "verify", "contoso2", "--wait")
        assert found["mismatches"] == 3 and found["compared"] == 8 * MiB // BLOCK
        assert found["blocks"] == [{"file": "contoso2.img", "blocks": [[1, 2], [1025, 1025]]}]
        table = primary.cli("replication", "verify", "contoso2", "--wait").stdout
        assert "contoso2" in table and "3" in table
        got = primary.json("replication", "get", "contoso2")
        assert got["health"] == "Critical"
        assert any("contoso2.img: 1-2, 1025" in r for r in got["health_reasons"]), got["health_reasons"]
        measured = primary.json("replication", "measure", "contoso2")
        assert measured["verify_mismatches"] == 3 and measured["last_clean_verify_time"] is None
        events = [json.loads(x) for x in primary.cli("events", "--vm", "contoso2", "-o", "json").stdout.splitlines()]
        assert [e["mismatches"] for e in events if e["event"] == "verify.mismatch"] == [3, 3]
        _, s = scrape(url)
        assert value(s, "replicad_verify_mismatches_total", vm="contoso2", role="primary") == 6

        r = primary.cli("replication", "verify", "contoso2", "--repair", "--wait", "-o", "json")
        assert json.loads(r.stdout)["mismatches"] == 3
        assert "(resync): 12288 bytes of data sent" in r.stderr  # only the three blocks
        wait_applied(primary, replica, "contoso2")
        assert file_digest(copy) == file_digest(image)

        clean = primary.json("replication", "verify", "contoso2", "--wait")
        assert clean["mismatches"] == 0
        assert primary.json("replication", "get", "contoso2")["health"] == "Normal"
        _, s = scrape(url)
        assert value(s, "replicad_last_clean_verify_age_seconds", vm="contoso2", role="primary") < 60
    finally:
        c.shutdown()

"""What the plan API takes (issue 19 item 2) is untrusted like any request: every malformed
body gets one error naming the field, and nothing is stored (the catalog's plans stay as
they were). One daemon in the test's process."""

import pytest

from .daemons import ApiFailed, InProcessHost


async def one(cluster) -> InProcessHost:
    host = cluster.add("vmhost1")
    await host.start()
    return host


@pytest.mark.parametrize("doc, said", [
    ({"name": "x/y", "vms": [{"vm": "db"}]}, "invalid plan name"),
    ({"name": "a" * 65, "vms": [{"vm": "db"}]}, "invalid plan name"),
    ({"name": "shop", "vms": []}, "1 to 64 VMs"),
    ({"name": "shop", "vms": "db"}, "1 to 64 VMs"),
    ({"name": "shop", "vms": [{"vm": f"v{i}"} for i in range(65)]}, "1 to 64 VMs"),
    ({"name": "shop", "vms": [{"vm": "../db"}]}, "invalid VM"),
    ({"name": "shop", "vms": ["db"]}, "invalid VM"),
    ({"name": "shop", "vms": [{"vm": "db", "delay": -1}]}, "0 to 86400 seconds"),
    ({"name": "shop", "vms": [{"vm": "db", "delay": True}]}, "0 to 86400 seconds"),
    ({"name": "shop", "vms": [{"vm": "db", "delay": 86401}]}, "0 to 86400 seconds"),
    ({"name": "shop", "vms": [{"vm": "db"}, {"vm": "db"}]}, "named twice"),
])
async def test_a_malformed_plan_is_refused_and_nothing_is_stored(cluster, doc, said):
    host = await one(cluster)
    with pytest.raises(ApiFailed) as e:
        await host.api("POST", "/v1/plans", doc)
    assert e.value.status == 400 and said in e.value.doc["error"]
    assert await host.api("GET", "/v1/plans") == []


async def test_a_plan_run_takes_only_its_options(cluster):
    host = await one(cluster)
    await host.api("POST", "/v1/plans", {"name": "shop", "vms": [{"vm": "db", "delay": 30}]})
    for path, body, said in [
        ("/v1/plans/shop/failover", {"prepare": True, "as_test": True}, "cannot be combined"),
        ("/v1/plans/shop/failover", {"prepare": "yes"}, "are flags"),
        ("/v1/plans/shop/start", {"as_test": True}, "go with `plan failover`"),
        ("/v1/plans/shop/failover", {"recovery_point": "yesterday"}, "ISO 8601"),
        ("/v1/plans/shop/failover", {"prepare": True, "recovery_point": "2026-11-29T10:00:00Z"}, "replica site"),
        ("/v1/plans/shop/explode", {}, "no plan operation"),
        ("/v1/plans/nothing/start", {}, "no plan named"),
    ]:
        with pytest.raises(ApiFailed) as e:
            await host.api("POST", path, body)
        assert said in e.value.doc["error"], (path, body, e.value.doc)
    got = await host.api("GET", "/v1/plans/shop")
    assert got["run"] is None and got["status"] == "never run"
    # a run whose VM does not exist stops at it, says so, and is recorded
    with pytest.raises(ApiFailed) as e:
        await host.api("POST", "/v1/plans/shop/start", {"wait": True})
    assert "plan shop stopped at db (start VM): no VM named db" in e.value.doc["error"]
    got = await host.api("GET", "/v1/plans/shop")
    assert got["status"] == "failed" and got["failed_vm"] == "db"

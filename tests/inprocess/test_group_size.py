"""A consistency group with more members than the conversations a primary opens with one
replica server at once (transport/client.py CONVERSATIONS_PER_REPLICA): every member's
cycle opens its conversation before the group's start barrier, so the members past the
limit waited for a slot the others held at the barrier — no group cycle ever completed,
and the group (ready, so the members ran no ticks of their own) replicated nothing."""

import pytest

from replicad.primary import group_cycle
from replicad.transport.client import CONVERSATIONS_PER_REPLICA

from ..integration.images import make_sparse_image
from .test_pair import applied, enable

MiB = 1 << 20


@pytest.mark.slow  # ~10 s: 17 initial copies
async def test_a_group_larger_than_the_conversation_limit_completes_its_cycle(pair, tmp_path, monkeypatch):
    monkeypatch.setattr(group_cycle, "MEET_WAIT", 5.0)  # without the fix: members wait here, then fail
    primary, replica = pair
    names = [f"g{i}" for i in range(CONVERSATIONS_PER_REPLICA + 1)]
    for name in names:
        image = tmp_path / f"{name}.img"
        make_sparse_image(image, 4 * MiB, data_pieces=1, seed=len(name))
        await enable(primary, replica, name, image)
        await primary.api("POST", f"/v1/replications/{name}/start-initial", {"wait": True})
    for name in names:
        await applied(primary, replica, name)
    await primary.api("POST", "/v1/plans", {"name": "big", "vms": [{"vm": n} for n in names]})
    got = await primary.api("PATCH", "/v1/plans/big", {"consistency": "group"})
    assert got["group_state"] == "ready", got
    out = await primary.api("POST", "/v1/plans/big/sync")
    assert sorted(c["vm"] for c in out["cycles"]) == sorted(names), out

"""A primary sends a resync in segments only to a replica that says it stages them (its
hello's `segments` capability, issue 20 item 4): a replica of an older version would take
each segment for the resync's point. Without the capability the resync is one cycle."""

from replicad.replica import segments
from replicad.transport import server

from ..integration.harness import file_digest
from ..integration.images import make_sparse_image, scribble
from .test_pair import applied, enable, replica_disk

MiB = 1 << 20


def staged(monkeypatch) -> list[tuple]:
    """The segments the replica stages (a spy on replica/segments.py: each is staged as ever)."""
    calls: list[tuple] = []
    real = segments.open_staging

    def spy(vmdir, header, *args):
        calls.append(header.segment)
        return real(vmdir, header, *args)
    monkeypatch.setattr(segments, "open_staging", spy)
    return calls


async def resync_of(pair, tmp_path) -> tuple[dict, str, str]:
    primary, replica = pair
    image = tmp_path / "w.img"
    make_sparse_image(image, 16 * MiB, data_pieces=4)
    await enable(primary, replica, "w", image)
    await primary.api("POST", "/v1/replications/w/start-initial", {"wait": True})
    await applied(primary, replica, "w")
    scribble(image, 300, seed=1)
    done = await primary.api("POST", "/v1/replications/w/resync", {"wait": True})
    await applied(primary, replica, "w")
    return done, file_digest(await replica_disk(replica, "w")), file_digest(image)


async def test_a_replica_that_stages_segments_gets_them(pair, tmp_path, monkeypatch):
    monkeypatch.setenv("REPLICAD_TEST_RESYNC_SEGMENT", str(4 * MiB))
    calls = staged(monkeypatch)
    done, copy, image = await resync_of(pair, tmp_path)
    assert done["kind"] == "resync" and copy == image
    assert [(i, last) for _, i, last in calls] == [(0, False), (1, False), (2, False), (3, False), (4, True)]


async def test_a_replica_without_the_capability_gets_one_cycle(pair, tmp_path, monkeypatch):
    monkeypatch.setenv("REPLICAD_TEST_RESYNC_SEGMENT", str(4 * MiB))
    hello = server._hello_info

    def older(*args, **kwargs):  # a replica of a version before segments
        info = hello(*args, **kwargs)
        return {**info, "capabilities": [c for c in info["capabilities"] if c != "segments"]}
    monkeypatch.setattr(server, "_hello_info", older)
    calls = staged(monkeypatch)
    done, copy, image = await resync_of(pair, tmp_path)
    assert done["kind"] == "resync" and copy == image
    assert calls == []

"""A segmented resync stopped between the view's advance and ``segments.json`` (a crash, a
full state disk): the next attempt must not take the segment as unsent against a view that
already holds it (it would send that range again as 'no difference' and the replica would
replace the staged segment with it: the copy silently misses the range)."""

import errno

import pytest

from replicad.primary import resync_progress

from ..integration.harness import file_digest
from ..integration.images import make_sparse_image, scribble
from .daemons import ApiFailed
from .test_pair import applied, enable, replica_disk

MiB = 1 << 20


@pytest.mark.slow  # ~6 s: the failed cycle is retried at the VM's next tick
async def test_a_segment_recorded_in_the_view_but_not_in_segments_json_is_not_lost(pair, tmp_path, monkeypatch):
    monkeypatch.setenv("REPLICAD_TEST_RESYNC_SEGMENT", str(4 * MiB))
    primary, replica = pair
    image = tmp_path / "w.img"
    make_sparse_image(image, 16 * MiB, data_pieces=4)
    await enable(primary, replica, "w", image)
    await primary.api("POST", "/v1/replications/w/start-initial", {"wait": True})
    await applied(primary, replica, "w")
    scribble(image, 400, seed=7)  # differences in every segment

    real, failed = resync_progress.save, []

    def save(work, got, *rest):  # the state disk fills up once, as segment 1 is recorded as sent
        if got.sent == 2 and not failed:
            failed.append(got.sent)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(work, got, *rest)
    monkeypatch.setattr(resync_progress, "save", save)
    with pytest.raises(ApiFailed):
        await primary.api("POST", "/v1/replications/w/resync", {"wait": True})
    assert failed
    done = await primary.api("POST", "/v1/replications/w/resync", {"wait": True})
    assert done["kind"] == "resync", done
    await applied(primary, replica, "w")
    assert file_digest(await replica_disk(replica, "w")) == file_digest(image)

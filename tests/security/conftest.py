import pytest

from ..integration.harness import Cluster


@pytest.fixture(params=["token", "certificate"])
def any_cluster(tmp_path, request):
    c = Cluster(tmp_path, names=("vmhost1", "vmhost2"), auth=request.param)
    yield c
    c.shutdown()

import pytest

from ..integration.harness import Cluster
from .helpers import three_hosts


@pytest.fixture(params=["token", "certificate"])
def any_cluster(tmp_path, request):
    c = Cluster(tmp_path, names=("vmhost1", "vmhost2"), auth=request.param)
    yield c
    c.shutdown()


@pytest.fixture(params=["token", "certificate"])
def three(tmp_path, request):
    """vmhost1, vmhost2, vmhost3 (three_hosts), over each listener in turn."""
    yield from three_hosts(tmp_path, request.param)


@pytest.fixture
def three_token(tmp_path):
    yield from three_hosts(tmp_path, "token")

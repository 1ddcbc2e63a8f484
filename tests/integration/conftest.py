import pytest

from .harness import Cluster


@pytest.fixture(params=["token", "certificate"])
def cluster(tmp_path, request):
    """The same scenarios over both listeners (port-80 tokens, port-443 mutual TLS)."""
    c = Cluster(tmp_path, auth=request.param)
    yield c
    c.shutdown()


@pytest.fixture
def token_cluster(tmp_path):
    """One listener only: for what the listener cannot change (capture, file sets, chains)."""
    c = Cluster(tmp_path, auth="token")
    yield c
    c.shutdown()


def article_pair(cluster):
    """vmhost2 (primary of contoso2) replicating to vmhost1, as the article sets it up."""
    v1, v2 = cluster["vmhost1"], cluster["vmhost2"]
    v1.start()
    v2.start()
    v1.cli("server", "set", "--enabled", "true", "--auth", cluster.auth, "--allow-any-server", "false")
    v1.cli("auth-entry", "add", "--primary", "*.contoso.com", "--trust-group", "Production")
    return v2, v1


@pytest.fixture
def pair(cluster):
    return article_pair(cluster)


@pytest.fixture
def token_pair(token_cluster):
    return article_pair(token_cluster)


@pytest.fixture
def two_host_pair(tmp_path):
    """The article's pair over tokens, with no third host to make (a few seconds less)."""
    c = Cluster(tmp_path, names=("vmhost1", "vmhost2"), auth="token")
    try:
        yield article_pair(c)
    finally:
        c.shutdown()


from .qemu_harness import qsd  # noqa: E402, F401 (the fixture of a qemu-storage-daemon, tests/integration/test_qemu*.py)

import pytest

from tests.integration.conftest import article_pair
from tests.integration.harness import Cluster


@pytest.fixture
def token_cluster(tmp_path):
    c = Cluster(tmp_path, auth="token")
    yield c
    c.shutdown()


@pytest.fixture
def token_pair(token_cluster):
    return article_pair(token_cluster)

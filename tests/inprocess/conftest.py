from pathlib import Path

import pytest

from replicad import events

from .daemons import InProcessCluster

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items):
    """The daemons run in the test's process, where warnings are errors: aiohttp's advice
    to key requests with ``web.RequestKey`` (the peer server keys them with strings) is what
    a daemon process prints once, not a failure."""
    for item in items:
        if HERE in Path(item.path).parents:
            item.add_marker(pytest.mark.filterwarnings("ignore::aiohttp.web_exceptions.NotAppKeyWarning"))


@pytest.fixture(autouse=True)
def _fresh_event_bus(monkeypatch):
    """The event bus is the process's (one daemon per process): each test's daemons get
    their own, so a daemon stopped in one test leaves no closed bus to the next."""
    monkeypatch.setattr(events, "bus", events.EventBus())


@pytest.fixture
async def cluster(tmp_path):
    async with InProcessCluster(tmp_path) as c:
        yield c


@pytest.fixture
async def pair(cluster):
    """(primary, replica): vmhost2 replicating to vmhost1 over tokens, both in this process."""
    return await cluster.pair()

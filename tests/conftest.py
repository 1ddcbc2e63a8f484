import pytest


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    """No test sees the developer's config or fault hooks."""
    monkeypatch.delenv("REPLICAD_CONFIG", raising=False)
    monkeypatch.delenv("REPLICAD_FAULT", raising=False)
    yield


_times: dict[str, float] = {}


def pytest_runtest_logreport(report):
    """With REPLICAD_TEST_TIMES=FILE, each test's wall time (setup + call + teardown) is
    appended to FILE as it ends: how `make test` is kept within its 20 minutes (the
    slowest cases go to the `slow` suite) even when a run is cut short."""
    import os

    path = os.environ.get("REPLICAD_TEST_TIMES")
    if not path:
        return
    _times[report.nodeid] = _times.get(report.nodeid, 0.0) + report.duration
    if report.when == "teardown":
        with open(path, "a") as f:
            f.write(f"{_times.pop(report.nodeid):9.2f} {report.nodeid}\n")

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


LISTENERS = ("token", "certificate")


def pytest_collection_modifyitems(config, items):
    """Each two-listener scenario runs over one listener in `make test` — chosen by the
    test's name, so both listeners are exercised across the suite — and over the other in
    `make test-slow` (marked ``slow``); CI runs both (README, Development)."""
    import zlib

    for item in items:
        spec = getattr(item, "callspec", None)
        modes = [v for v in (spec.params.values() if spec else ()) if isinstance(v, str) and v in LISTENERS]
        if not modes:
            continue
        if modes[0] != LISTENERS[zlib.crc32(item.originalname.encode()) % 2]:
            item.add_marker(pytest.mark.slow)

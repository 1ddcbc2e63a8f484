import pytest


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    """No test sees the developer's config or fault hooks."""
    monkeypatch.delenv("REPLICAD_CONFIG", raising=False)
    monkeypatch.delenv("REPLICAD_FAULT", raising=False)
    yield

# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo lint test test-slow unit integration bench compose-demo dist clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The `kerberos` extra (python-gssapi) builds from source (~1-3 min): .ci/kerberos-wheel
# builds it once into /var/cache/replicad-tests/wheels and installs it from there.
# libnbd's Python bindings come from Debian (python3-libnbd; .ci/system-packages installs it
# as root): linked into the venv when their ABI matches its Python (the qemu tracker's NBD reads).
$(STAMP): $(BIN)/python pyproject.toml
	@.ci/system-packages
	$(BIN)/pip install -q -e '.[test,lint]'
	@.ci/kerberos-wheel $(BIN)/python
	@suffix=$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))'); \
	site=$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))'); \
	if [ -e /usr/lib/python3/dist-packages/libnbdmod$$suffix ]; then \
		ln -sf /usr/lib/python3/dist-packages/nbd.py /usr/lib/python3/dist-packages/libnbdmod$$suffix "$$site"/; fi
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/replicad demo

# ruff (style, bugbear, asyncio rules) and mypy (types), as configured in pyproject.toml; also
# the pre-commit hooks (.pre-commit-config.yaml). A few seconds: mypy keeps its cache in .mypy_cache.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

# Lint first: a finding fails the run before the tests start. The 30 slowest cases are listed
# at the end: `make test` must stay under 20 minutes on a 2-core machine, and a case that grows
# past a few seconds belongs in the slow suite (`@pytest.mark.slow`).
test: lint
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=30 -m "not slow" tests

# The long cases (marked `slow`): soaks and long model runs. .ci/run runs them after `make test`.
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -m slow tests || [ $$? = 5 ]  # 5: none collected

unit: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/unit tests/inprocess

integration: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/integration

# Not part of `make test`: replicad against rsync and this machine's limits (bench/suite.py,
# docs/performance.md). rsync is installed when missing and we are root.
bench: $(STAMP)
	@command -v rsync >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get install -y -q rsync >/dev/null; } \
		|| { echo "make bench needs rsync (apt-get install rsync)"; exit 2; }
	$(BIN)/python bench/suite.py

# The article's story in three containers (docker-compose.yml, docker/compose_demo.py);
# skips with the reason where `docker info` does not answer.
compose-demo: $(STAMP)
	$(BIN)/python docker/compose_demo.py

# A wheel to install on hosts without this repository (README, quick start):
# copy it over, then /opt/replicad/bin/pip install ./replicad-*.whl there.
DIST ?= dist
dist: $(BIN)/python
	$(BIN)/pip wheel -q --no-deps -w $(DIST) .
	@ls $(DIST)/replicad-*.whl

clean:
	rm -rf $(VENV) build dist src/*.egg-info

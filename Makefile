# kho-fleet: `make demo` (a rollout on the simulated fleet) and `make test` (the whole suite).
# Both bootstrap what they need first (Debian packages when root, a virtualenv, pip packages).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.bootstrapped

.PHONY: all bootstrap lint test demo bench clean

all: test

$(STAMP): pyproject.toml scripts/bootstrap.sh
	VENV=$(VENV) bash scripts/bootstrap.sh

bootstrap: $(STAMP)

# ruff and mypy as configured in pyproject.toml; fails on any error. `make test` runs the
# same two checks as tests (tests/test_tooling.py, marker `lint`), with the doctests.
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy

# Two pytest-xdist workers, each file on one worker (tests/conftest.py puts the lab files
# first). TEST_WORKERS=0 runs in one process. The base temp dir is short and this run's own:
# the twins' AF_UNIX sockets live under test dirs, and a path has at most 107 bytes.
TEST_WORKERS ?= 2
test: $(STAMP)
	@d=$$(mktemp -d /tmp/kt.XXXXXX); \
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --durations=25 --basetemp=$$d; \
	rc=$$?; rm -rf $$d; exit $$rc

demo: $(STAMP)
	$(PY) -m kho_fleet.demo

bench: $(STAMP)
	$(PY) bench/radix_walk.py
	$(PY) bench/verify_throughput.py
	$(PY) bench/inspect_scan.py
	$(PY) bench/fill_pattern.py
	$(PY) bench/agent_kexec.py 1024
	$(PY) bench/controller_scale.py 10000 500
	$(PY) bench/engine_scale.py 1000

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache

# cdc-relay developer commands. `make demo` and `make test` work on a fresh machine:
# they create .venv, install the package with its test extras, and start their own
# throwaway Postgres and RabbitMQ (installing the server packages if missing), and
# fetch PostgreSQL 16/17/18 once (devtools/pgbinaries.py) for the version tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: venv servers demo accel test test-unit lint format bench clean

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m devtools.pgbinaries
	touch $(STAMP)

venv: $(STAMP)

servers:
	@sh scripts/ensure-servers.sh

# Run from the repository root as modules, so that the dev tooling (devtools/,
# never installed) is importable.
demo: venv servers
	$(BIN)/python -m scripts.demo

lint: venv
	$(BIN)/ruff check cdc_relay devtools tests scripts bench
	$(BIN)/ruff format --check cdc_relay devtools tests scripts bench
	$(BIN)/mypy

format: venv
	$(BIN)/ruff check --fix cdc_relay devtools tests scripts bench
	$(BIN)/ruff format cdc_relay devtools tests scripts bench

# The hot path compiled by Cython, in place (docs/accelerator.md): only the modules whose
# source changed since the last build. Without a C compiler it says so in one line.
accel: venv
	$(BIN)/python setup.py -q build_ext --inplace

# Everything on the compiled hot path, then the server-less suite again on pure Python
# (the reference; tests/test_accel_differential.py compares the two, so it runs once).
test: venv servers lint accel
	$(BIN)/python -m pytest $(PYTEST_ARGS)
	CDC_RELAY_PURE_PYTHON=1 DEVTOOLS_FORBID_SERVERS=1 $(BIN)/python -m pytest -m "not integration" \
		--ignore=tests/test_accel_differential.py $(PYTEST_ARGS)

# Every test that needs no server (no Postgres, no RabbitMQ): well under a minute.
# Starting a server is an error here, so an integration test without its mark fails.
test-unit: venv accel
	DEVTOOLS_FORBID_SERVERS=1 $(BIN)/python -m pytest -m "not integration" $(PYTEST_ARGS)

bench: venv servers
	$(BIN)/python -m bench $(if $(QUICK),--quick,)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info cdc_relay/_accel_manifest.json
	find cdc_relay -name '*.so' -delete

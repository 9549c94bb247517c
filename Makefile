# cdc-relay developer commands. `make demo` and `make test` work on a fresh machine:
# they create .venv, install the package with its test extras, and start their own
# throwaway Postgres and RabbitMQ (installing the server packages if missing), and
# fetch PostgreSQL 16/17/18 once (devtools/pgbinaries.py) for the version tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: venv servers demo test test-unit lint format bench clean

$(STAMP): pyproject.toml
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

test: venv servers lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Every test that needs no server (no Postgres, no RabbitMQ): well under a minute.
# Starting a server is an error here, so an integration test without its mark fails.
test-unit: venv
	DEVTOOLS_FORBID_SERVERS=1 $(BIN)/python -m pytest -m "not integration" $(PYTEST_ARGS)

bench: venv servers
	$(BIN)/python -m bench $(if $(QUICK),--quick,)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info

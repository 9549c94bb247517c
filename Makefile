# cdc-relay developer commands. `make demo` and `make test` work on a fresh machine:
# they create .venv, install the package with its test extras, and start their own
# throwaway Postgres and RabbitMQ (installing the server packages if missing).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: venv servers demo test lint format bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

servers:
	@sh scripts/ensure-servers.sh

demo: venv servers
	$(BIN)/python scripts/demo.py

lint: venv
	$(BIN)/ruff check cdc_relay tests scripts bench
	$(BIN)/ruff format --check cdc_relay tests scripts bench

format: venv
	$(BIN)/ruff check --fix cdc_relay tests scripts bench
	$(BIN)/ruff format cdc_relay tests scripts bench

test: venv servers lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: venv servers
	$(BIN)/python -m bench $(if $(QUICK),--quick,)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info

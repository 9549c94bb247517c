"""Postgres fixtures (a pytest plugin, loaded from conftest's ``pytest_plugins``).

``CDC_RELAY_TEST_DSN`` (e.g. docker compose users) replaces the throwaway
server for tests that only need a DSN; the server fixture is started lazily,
so a session that uses an external server never boots its own. Tests that
crash or restart servers own theirs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from devtools.servers import PostgresServer


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    """One private Postgres (wal_level=logical) for the whole session."""
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def pg_dsn(request: pytest.FixtureRequest) -> str:
    """DSN of the external server if configured, else of the session's own."""
    external = os.environ.get("CDC_RELAY_TEST_DSN")
    if external:
        return external
    server: PostgresServer = request.getfixturevalue("pg_server")
    return server.dsn

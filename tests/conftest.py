"""Session-wide throwaway servers; env vars point tests at external ones instead.

``CDC_RELAY_TEST_DSN`` / ``CDC_RELAY_TEST_AMQP_URL`` (e.g. docker compose
users) replace the throwaway servers for tests that only need a URL; the
server fixtures are started lazily, so a session that uses external servers
never boots its own. Tests that crash or restart servers own theirs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from cdc_relay.devservers import PostgresServer, RabbitServer


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    """One private Postgres (wal_level=logical) for the whole session."""
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def rabbit_server() -> Iterator[RabbitServer]:
    """One private RabbitMQ node for the whole session."""
    server = RabbitServer()
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


@pytest.fixture
def amqp_url(request: pytest.FixtureRequest) -> str:
    """AMQP URL of the external broker if configured, else of the session's own."""
    external = os.environ.get("CDC_RELAY_TEST_AMQP_URL")
    if external:
        return external
    server: RabbitServer = request.getfixturevalue("rabbit_server")
    return server.amqp_url

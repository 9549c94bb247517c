"""Session-wide throwaway servers; env vars point tests at external ones instead."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from cdc_relay.devservers import PostgresServer, RabbitServer


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    server = PostgresServer()
    server.start()
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def rabbit_server() -> Iterator[RabbitServer]:
    server = RabbitServer()
    server.start()
    yield server
    server.cleanup()


@pytest.fixture
def pg_dsn(request: pytest.FixtureRequest) -> str:
    external = os.environ.get("CDC_RELAY_TEST_DSN")
    if external:
        return external
    return request.getfixturevalue("pg_server").dsn


@pytest.fixture
def amqp_url(request: pytest.FixtureRequest) -> str:
    external = os.environ.get("CDC_RELAY_TEST_AMQP_URL")
    if external:
        return external
    return request.getfixturevalue("rabbit_server").amqp_url

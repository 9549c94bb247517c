"""RabbitMQ fixtures (a pytest plugin, loaded from conftest's ``pytest_plugins``).

``CDC_RELAY_TEST_AMQP_URL`` replaces the throwaway node for tests that only
need a URL; the node is started lazily, only when a test asks for it. Tests
that crash a node or need TLS get their own from ``rabbit_factory``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from devtools.servers import RabbitServer
from tests.fix_pg import ServerFactory


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
def amqp_url(request: pytest.FixtureRequest) -> str:
    """AMQP URL of the external broker if configured, else of the session's own."""
    external = os.environ.get("CDC_RELAY_TEST_AMQP_URL")
    if external:
        return external
    server: RabbitServer = request.getfixturevalue("rabbit_server")
    return server.amqp_url


@pytest.fixture(scope="module")
def rabbit_factory() -> Iterator[ServerFactory[RabbitServer]]:
    """``rabbit_factory(tls=..., external=...)``: a private node the module may crash."""
    factory = ServerFactory(RabbitServer)
    try:
        yield factory
    finally:
        factory.close()

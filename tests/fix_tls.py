"""TLS fixtures (issue 10), a pytest plugin loaded from conftest's ``pytest_plugins``.

One CA and its certificates per session (``tls_files``), and TLS-only servers
started lazily, only for the tests that ask for them.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from devtools.servers import PostgresServer, RabbitServer
from devtools.tls import TlsFiles, make_tls_files


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A trustme CA, a server certificate for localhost/127.0.0.1 and a client certificate."""
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="session")
def pg_tls_server(tls_files: TlsFiles) -> Iterator[PostgresServer]:
    """A Postgres that accepts TCP only over TLS; its ``dsn`` verifies the server (verify-full)."""
    with PostgresServer(ssl=tls_files) as server:
        yield server


@pytest.fixture(scope="session")
def rabbit_tls_server(tls_files: TlsFiles) -> Iterator[RabbitServer]:
    """A RabbitMQ node with only a TLS listener; ``amqp_url`` is ``amqps://`` with cacertfile."""
    with RabbitServer(tls=tls_files) as server:
        yield server

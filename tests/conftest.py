"""Fixture plugins and the ``integration`` marker.

Fixtures live in ``tests/fix_*.py`` plugins (psycopg's layout). A test is an
integration test when it needs a server: it requests a server fixture (even
indirectly), it is a fault test, or its module uses the throwaway server
classes itself. Everything else is a unit test, run by ``make test-unit``
(``-m "not integration"``), where starting a server is an error
(``DEVTOOLS_FORBID_SERVERS``) so that a missing mark cannot go unnoticed.
"""

from __future__ import annotations

import pytest

pytest_plugins = [
    "tests.fix_pg",
    "tests.fix_rabbit",
    "tests.fix_tls",
    "tests.fix_ha",
    "tests.fix_outbox",
    "tests.fix_prometheus",
]

SERVER_FIXTURES = frozenset(
    {
        "pg_server",
        "rabbit_server",
        "pg_dsn",
        "amqp_url",
        "pg_tls_server",
        "rabbit_tls_server",
        "rabbit_cluster",
        "pg_pair",
        "pg_factory",
        "rabbit_factory",
        "prometheus_factory",
    }
)
SERVER_CLASSES = (
    "PostgresServer",
    "RabbitServer",
    "RabbitCluster",
    "PostgresPair",
    "PrometheusServer",
)


def needs_server(item: pytest.Item) -> bool:
    """Whether ``item`` talks to a real Postgres, RabbitMQ or Prometheus."""
    if item.get_closest_marker("fault") or item.get_closest_marker("integration"):
        return True
    if SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
        return True
    module = getattr(item, "module", None)
    return module is not None and any(name in vars(module) for name in SERVER_CLASSES)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if needs_server(item) and not item.get_closest_marker("integration"):
            item.add_marker(pytest.mark.integration)

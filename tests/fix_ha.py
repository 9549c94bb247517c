"""High-availability fixtures (issue 11), a pytest plugin loaded from conftest.

Module-scoped: HA tests kill and promote servers, so each module gets its own.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from devtools.cluster import RabbitCluster
from devtools.pgha import PostgresPair


@pytest.fixture(scope="module")
def rabbit_cluster() -> Iterator[RabbitCluster]:
    """Three clustered RabbitMQ nodes (about 30 s to boot on 2 cores)."""
    with RabbitCluster(3) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def pg_pair() -> Iterator[PostgresPair]:
    """A PostgreSQL 17 primary and a standby that syncs failover slots."""
    with PostgresPair(version=17) as pair:
        yield pair

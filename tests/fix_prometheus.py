"""Prometheus fixtures (a pytest plugin, loaded from conftest's ``pytest_plugins``).

A Prometheus is only useful with the targets and rules of one test, which are
known only inside it, so the plugin hands out a factory rather than a shared
server: ``prometheus_factory(targets=[...], rule_files=[...])`` starts one on
a free loopback port, and the module's end takes every one down.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from devtools.prometheus import PrometheusServer
from tests.fix_pg import ServerFactory


@pytest.fixture(scope="module")
def prometheus_factory() -> Iterator[ServerFactory[PrometheusServer]]:
    """``prometheus_factory(targets=..., rule_files=..., evaluation_interval=...)``."""
    factory = ServerFactory(PrometheusServer)
    try:
        yield factory
    finally:
        factory.close()

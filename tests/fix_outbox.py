"""Fixtures most integration tests share: an initialised outbox, a consumer, relay processes.

A test module that needs something else (its own names, a fake broker URL, an
exchange of another type) defines its own fixture of the same name, which
takes precedence over these.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.harness import Consumer, RelayProcess, Setup, unique_names


@pytest.fixture
def outbox(request: pytest.FixtureRequest, pg_dsn: str, amqp_url: str) -> Iterator[Setup]:
    """Table, dead-letter table, publication, slot and exchange names no other test uses."""
    module = request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_")
    setup = Setup(pg_dsn, amqp_url, unique_names(module[:10]))
    setup.init()
    yield setup
    setup.cleanup()


@pytest_asyncio.fixture
async def consumer(outbox: Setup) -> AsyncIterator[Consumer]:
    """A queue bound to the outbox's exchange with ``#``, collecting every delivery."""
    c = await Consumer(outbox.amqp_url, outbox.names["exchange"]).start()
    yield c
    await c.close()


@pytest.fixture
def relays(tmp_path: Path) -> Iterator[Callable[..., RelayProcess]]:
    """Start ``cdc-relay run`` processes (logs in tmp_path); all are killed afterwards."""
    started: list[RelayProcess] = []

    def start(setup: Setup, *extra: str, name: str = "relay") -> RelayProcess:
        relay = RelayProcess(setup, tmp_path / f"{name}-{len(started)}.log", *extra).start()
        started.append(relay)
        return relay

    yield start
    for relay in started:
        relay.stop_quietly()
        # Shown by pytest only when the test failed: what each relay said.
        print(f"--- {relay.log_path.name} ---\n{relay.log_tail(6000)}")

"""The table-less outbox under the fault suite: kill -9 of the relay, broker stop/start.

Emitted messages live only in WAL, so the slot is their only copy: every
committed ``outbox_emit`` must arrive after the relay dies mid-stream or the
broker goes away. Own servers (module scope), because the broker is restarted.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
import pytest_asyncio

from cdc_relay.pg import setup as pg_setup
from cdc_relay.schema import function_names
from devtools.metrics import readyz
from devtools.servers import PostgresServer, RabbitServer, free_port
from tests.faults import bounce_broker
from tests.fix_pg import ServerFactory
from tests.harness import Consumer, Setup, unique_names, wait_until

pytestmark = [pytest.mark.asyncio, pytest.mark.fault]


@pytest.fixture(scope="module")
def emit_pg(pg_factory: ServerFactory[PostgresServer]) -> PostgresServer:
    return pg_factory(settings={"wal_sender_timeout": "'10s'"})


@pytest.fixture(scope="module")
def emit_rabbit(rabbit_factory: ServerFactory[RabbitServer]) -> RabbitServer:
    return rabbit_factory()


@pytest_asyncio.fixture
async def tableless(emit_pg: PostgresServer, emit_rabbit: RabbitServer) -> AsyncIterator[Setup]:
    setup = Setup(emit_pg.dsn, emit_rabbit.amqp_url, unique_names("emf"))
    with psycopg.connect(setup.dsn, autocommit=True) as conn:
        pg_setup.init(conn, setup.settings, create_table=False)
    yield setup
    if not emit_rabbit.is_running():
        emit_rabbit.start()
    setup.cleanup()


@pytest_asyncio.fixture
async def consumer(tableless: Setup) -> AsyncIterator[Consumer]:
    c = await Consumer(tableless.amqp_url, tableless.names["exchange"]).start()
    yield c
    await c.close()


class EmitWorkload:
    """Writer threads calling outbox_emit in transactions of 1-20; ids kept once committed."""

    def __init__(self, setup: Setup, total: int, per_second: float, writers: int = 3) -> None:
        self.setup = setup
        self.total = total
        self.pace = writers / per_second
        self.writers = writers
        self.committed: list[str] = []
        self.aborted: list[str] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        schema, _ = setup.settings.table_parts
        self.function = f"{schema}.{function_names(setup.settings.table_parts)[1]}"

    def start(self) -> EmitWorkload:
        for w in range(self.writers):
            thread = threading.Thread(target=self._write, args=(w,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def _write(self, writer: int) -> None:
        rng = random.Random(writer)
        rows = self.total // self.writers
        written = 0
        with psycopg.connect(self.setup.dsn) as conn, conn.cursor() as cur:
            while written < rows:
                size = min(rng.choice([1, 1, 3, 20]), rows - written)
                ids = []
                for i in range(size):
                    row = cur.execute(
                        f"SELECT {self.function}('fault', %s, 'Emitted',"
                        " jsonb_build_object('w', %s, 'n', %s))::text",
                        (f"w{writer}", writer, written + i),
                    ).fetchone()
                    assert row is not None
                    ids.append(row[0])
                if rng.random() < 0.05:
                    conn.rollback()  # never to be published
                    with self._lock:
                        self.aborted += ids
                    continue
                conn.commit()
                with self._lock:
                    self.committed += ids
                written += size
                time.sleep(self.pace * size)

    async def wait(self) -> None:
        for thread in self._threads:
            await asyncio.to_thread(thread.join, 120)


async def verify(workload: EmitWorkload, consumer: Consumer) -> None:
    await consumer.wait_for(set(workload.committed), timeout=120)
    await consumer.settle(1.0)
    assert not set(workload.aborted) & set(consumer.ids())


async def test_tableless_relay_kill_9_five_times(
    tableless: Setup, consumer: Consumer, relays: Any
) -> None:
    workload = EmitWorkload(tableless, total=6000, per_second=1000).start()
    rng = random.Random(3)
    for _ in range(5):
        relay = relays(tableless, "--max-in-flight", "200")
        await relay.wait_for_log_async("streaming from slot", timeout=60)
        await asyncio.sleep(rng.uniform(0.3, 1.5))
        relay.kill()
    relays(tableless)
    await workload.wait()
    await verify(workload, consumer)
    assert len(workload.committed) >= 5000


async def test_tableless_broker_stopped_and_started_twice(
    tableless: Setup, consumer: Consumer, relays: Any, emit_rabbit: RabbitServer
) -> None:
    port = free_port()
    relays(tableless, "--metrics-port", str(port), "--confirm-timeout", "5", "--heartbeat", "2")
    assert await wait_until(lambda: readyz(port) == 200, 30)
    workload = EmitWorkload(tableless, total=5000, per_second=800).start()
    await bounce_broker(emit_rabbit, port, 2)
    await workload.wait()
    await verify(workload, consumer)

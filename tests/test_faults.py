"""At-least-once under crashes, restarts and network faults (real processes, real cuts).

These tests own their servers (module scope) because they kill and restart them.
Each prints one verdict line; run with ``-s`` to see the table.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
import pytest_asyncio

from cdc_relay.config import EX_CONFIG
from devtools.amqp import queue_depth
from devtools.consumer import SeqCounter
from devtools.metrics import readyz
from devtools.servers import PostgresServer, RabbitServer, free_port
from tests.faults import Verdict, Workload, bounce_broker, verify
from tests.fix_pg import ServerFactory
from tests.harness import Consumer, RelayProcess, Setup, run_cli, unique_names, wait_until
from tests.proxy import TcpProxy

pytestmark = [pytest.mark.asyncio, pytest.mark.fault]
VERDICTS: list[str] = []


@pytest.fixture(scope="module")
def fault_pg(pg_factory: ServerFactory[PostgresServer]) -> PostgresServer:
    return pg_factory(settings={"wal_sender_timeout": "'10s'"})


@pytest.fixture(scope="module")
def fault_rabbit(rabbit_factory: ServerFactory[RabbitServer]) -> RabbitServer:
    return rabbit_factory()


@pytest.fixture(autouse=True)
def servers_running(fault_pg: PostgresServer, fault_rabbit: RabbitServer) -> Iterator[None]:
    """Whatever a test did to the servers, the next one finds them up."""
    yield
    if not fault_pg.is_running():
        fault_pg.start()
    if not fault_rabbit.is_running():
        fault_rabbit.start()
    with psycopg.connect(fault_pg.dsn, autocommit=True) as conn:
        conn.execute("SELECT 1")


@pytest.fixture(scope="module", autouse=True)
def print_verdicts() -> Iterator[None]:
    yield
    print("\nfault suite verdicts:\n" + "\n".join(VERDICTS))


@pytest_asyncio.fixture
async def outbox(fault_pg: PostgresServer, fault_rabbit: RabbitServer) -> AsyncIterator[Setup]:
    setup = Setup(fault_pg.dsn, fault_rabbit.amqp_url, unique_names("flt"))
    setup.init()
    yield setup
    if fault_pg.is_running():
        setup.cleanup()


def record(name: str, verdict: Verdict) -> None:
    VERDICTS.append(verdict.row(name))
    print(verdict.row(name))
    assert verdict.lost == 0


async def test_relay_kill_9_ten_times(outbox: Setup, consumer: Consumer, relays: Any) -> None:
    window = 500
    workload = Workload(outbox, total_rows=50_000, rows_per_second=4000).start()
    rng = random.Random(7)
    for _ in range(10):
        relay = relays(outbox, "--max-in-flight", str(window))
        relay.wait_for_log("streaming from slot", timeout=60)
        await asyncio.sleep(rng.uniform(0.3, 2.0))
        relay.kill()
    relays(outbox, "--max-in-flight", str(window))
    await workload.wait()
    verdict = await verify(outbox, consumer, timeout=180)
    record("relay kill -9 x10", verdict)
    assert verdict.committed >= 45_000


async def test_broker_stopped_and_started_three_times(
    outbox: Setup, consumer: Consumer, relays: Any, fault_rabbit: RabbitServer
) -> None:
    port = free_port()
    relays(outbox, "--metrics-port", str(port), "--confirm-timeout", "5", "--heartbeat", "2")
    assert await wait_until(lambda: readyz(port) == 200, 30)
    workload = Workload(outbox, total_rows=15_000, rows_per_second=1500).start()
    await bounce_broker(fault_rabbit, port, 3)
    await workload.wait()
    record("broker stop/start x3", await verify(outbox, consumer))


async def test_postgres_fast_restart_and_crash(
    outbox: Setup, consumer: Consumer, relays: Any, fault_pg: PostgresServer
) -> None:
    relay = relays(outbox)
    relay.wait_for_log("streaming from slot")
    workload = Workload(outbox, total_rows=12_000, rows_per_second=1500).start()
    await asyncio.sleep(2)
    await asyncio.to_thread(fault_pg.restart, "fast")
    await asyncio.sleep(2)
    await asyncio.to_thread(fault_pg.stop, "immediate")  # a crash: recovery on start
    await asyncio.sleep(0.5)
    await asyncio.to_thread(fault_pg.start)
    await asyncio.sleep(2)
    await asyncio.to_thread(fault_pg.kill)  # SIGKILL of every Postgres process
    await asyncio.to_thread(fault_pg.start)
    await workload.wait()
    verdict = await verify(outbox, consumer)
    assert relay.log().count("streaming from slot") >= 4
    record("postgres fast restart + immediate stop + kill -9", verdict)


async def _cut_and_time(relay: RelayProcess, action: Any, heal: Any = None) -> float:
    """Run a network fault; return seconds until the relay ended its session."""
    before = relay.log().count("session ended")
    started = time.monotonic()
    action()
    ok = await wait_until(lambda: relay.log().count("session ended") > before, 30, 0.05)
    detected = time.monotonic() - started
    if heal is not None:
        heal()
    assert ok, "relay did not notice the fault"
    return detected


async def test_network_cuts_reset_and_silent_partition(
    outbox: Setup,
    consumer: Consumer,
    relays: Any,
    fault_pg: PostgresServer,
    fault_rabbit: RabbitServer,
) -> None:
    pg_proxy = await TcpProxy("127.0.0.1", fault_pg.port).start()
    mq_proxy = await TcpProxy("127.0.0.1", fault_rabbit.port).start()
    via_proxy = Setup(
        f"postgresql://postgres@127.0.0.1:{pg_proxy.port}/postgres",
        f"amqp://guest:guest@127.0.0.1:{mq_proxy.port}/",
        outbox.names,
    )
    relay = relays(
        via_proxy,
        "--pg-timeout",
        "3",
        "--heartbeat",
        "2",
        "--confirm-timeout",
        "4",
        "--tcp-keepalive-idle",
        "1",
        "--tcp-keepalive-interval",
        "1",
        "--tcp-keepalive-count",
        "2",
    )
    try:
        await relay.wait_for_log_async("streaming from slot")
        workload = Workload(outbox, total_rows=10_000, rows_per_second=500).start()
        timings = {}
        await asyncio.sleep(1)
        timings["pg reset"] = await _cut_and_time(relay, pg_proxy.reset)
        await relay.wait_for_log_async("streaming from slot")
        await asyncio.sleep(1)
        timings["amqp reset"] = await _cut_and_time(relay, mq_proxy.reset)
        await asyncio.sleep(2)
        timings["pg partition"] = await _cut_and_time(relay, pg_proxy.partition, pg_proxy.heal)
        await asyncio.sleep(2)
        timings["amqp partition"] = await _cut_and_time(relay, mq_proxy.partition, mq_proxy.heal)
        await workload.wait()
        verdict = await verify(outbox, consumer)
        record(
            "network cuts ("
            + ", ".join(f"{k} noticed in {v:.1f}s" for k, v in timings.items())
            + ")",
            verdict,
        )
        assert timings["pg partition"] < 10
        assert timings["amqp partition"] < 10
    finally:
        await pg_proxy.close()
        await mq_proxy.close()


async def test_memory_alarm_blocks_then_everything_arrives(
    outbox: Setup, consumer: Consumer, relays: Any, fault_rabbit: RabbitServer
) -> None:
    relay = relays(outbox, "--confirm-timeout", "3")
    relay.wait_for_log("streaming from slot")
    workload = Workload(outbox, total_rows=4_000, rows_per_second=800).start()
    await asyncio.sleep(1)
    fault_rabbit.ctl("set_vm_memory_high_watermark", "0.0000001")
    try:
        await asyncio.sleep(6)
        before = len(consumer.deliveries)
        await asyncio.sleep(2)
        assert len(consumer.deliveries) == before, "publishing went on under a memory alarm"
    finally:
        fault_rabbit.ctl("set_vm_memory_high_watermark", "0.4")
    await workload.wait()
    record("memory alarm (connection blocked) 8s", await verify(outbox, consumer))


async def test_postgres_shutdown_while_broker_is_down(
    outbox: Setup,
    consumer: Consumer,
    relays: Any,
    fault_pg: PostgresServer,
    fault_rabbit: RabbitServer,
) -> None:
    relay = relays(outbox, "--confirm-timeout", "3")
    relay.wait_for_log("streaming from slot")
    workload = Workload(outbox, total_rows=3_000, rows_per_second=1000).start()
    await asyncio.sleep(1)
    await asyncio.to_thread(fault_rabbit.stop)
    started = time.monotonic()
    await asyncio.to_thread(fault_pg.stop, "fast")
    shutdown = time.monotonic() - started
    assert shutdown < 10, f"Postgres shutdown blocked for {shutdown:.1f}s"
    await asyncio.to_thread(fault_pg.start)
    await asyncio.to_thread(fault_rabbit.start)
    await workload.wait()
    verdict = await verify(outbox, consumer)
    record(f"pg shutdown with broker down (shutdown took {shutdown:.1f}s)", verdict)


async def test_slot_dropped_while_running_is_a_clear_error(outbox: Setup, relays: Any) -> None:
    relay = relays(outbox, "--metrics-port", str(free_port()))
    relay.wait_for_log("streaming from slot")
    slot = outbox.names["slot"]
    with psycopg.connect(outbox.dsn, autocommit=True) as conn:
        # Terminate the walsender and drop the slot before the relay is back.
        for _ in range(100):
            conn.execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots"
                " WHERE slot_name = %s AND active_pid IS NOT NULL",
                (slot,),
            )
            try:
                conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
                break
            except psycopg.errors.ObjectInUse:
                time.sleep(0.01)
    assert relay.proc is not None
    code = await asyncio.to_thread(relay.proc.wait, 60)
    assert code == EX_CONFIG
    assert f"slot {slot}" in relay.log() and "does not exist" in relay.log()


async def test_invalidated_slot_is_a_clear_error(
    fault_pg: PostgresServer, fault_rabbit: RabbitServer, relays: Any
) -> None:
    setup = Setup(fault_pg.dsn, fault_rabbit.amqp_url, unique_names("inv"))
    setup.init()
    try:
        with psycopg.connect(fault_pg.dsn, autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'")
            conn.execute("SELECT pg_reload_conf()")
            conn.execute("CREATE TABLE IF NOT EXISTS wal_filler (data text)")
            fill = "INSERT INTO wal_filler SELECT repeat('x', 1000) FROM generate_series(1, 5000)"
            conn.execute(fill)
            conn.execute("SELECT pg_switch_wal()")
            # Past the cap, before a checkpoint: status warns while there is time to act.
            warned = run_cli("status", "--json", "--no-require-active", *setup.cli_args("status"))
            assert warned.returncode == 1, (warned.stdout, warned.stderr)
            info = orjson.loads(warned.stdout)
            assert info["wal_status"] == "unreserved", info
            assert "about to be invalidated" in info["problems"][0], info
            for _ in range(6):
                conn.execute(fill)
                conn.execute("SELECT pg_switch_wal()")
                conn.execute("CHECKPOINT")
            status = conn.execute(
                "SELECT wal_status FROM pg_replication_slots WHERE slot_name = %s",
                (setup.names["slot"],),
            ).fetchone()
            assert status is not None and status[0] == "lost", status
        lost = run_cli("status", "--json", "--no-require-active", *setup.cli_args("status"))
        assert lost.returncode == 1, (lost.stdout, lost.stderr)
        assert "was invalidated" in orjson.loads(lost.stdout)["problems"][0]
        relay = relays(setup)
        assert relay.proc is not None
        code = await asyncio.to_thread(relay.proc.wait, 60)
        assert code == EX_CONFIG
        assert "invalidated" in relay.log()
    finally:
        with psycopg.connect(fault_pg.dsn, autocommit=True) as conn:
            conn.execute("ALTER SYSTEM RESET max_slot_wal_keep_size")
            conn.execute("SELECT pg_reload_conf()")
            conn.execute("DROP TABLE IF EXISTS wal_filler")
        setup.cleanup()


BIG_ROWS = int(os.environ.get("CDC_RELAY_TEST_BIG_ROWS", "200000"))


def vm_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


@pytest.mark.timeout(900)
async def test_huge_transaction_bounded_memory_and_replay_after_crash(
    outbox: Setup, relays: Any
) -> None:
    consumer = Consumer(outbox.amqp_url, outbox.names["exchange"])
    await consumer.start()  # declares and binds the queue; it fills while we wait
    await consumer.close()
    queue = consumer.queue_name
    relay = relays(outbox)
    await relay.wait_for_log_async("streaming from slot")
    started = time.monotonic()
    with psycopg.connect(outbox.dsn) as conn:
        conn.execute(
            f"INSERT INTO {outbox.table} (aggregate_type, aggregate_id, event_type, payload)"
            " SELECT 'big', g::text, 'Bulk', jsonb_build_object('g', g)"
            " FROM generate_series(1, %s) g",
            (BIG_ROWS,),
        )
        conn.commit()
    inserted = time.monotonic() - started
    # Crash the relay when about 40% of the transaction is in the queue.
    deadline = time.monotonic() + 600
    while await queue_depth(outbox.amqp_url, queue) < BIG_ROWS * 0.4:
        assert time.monotonic() < deadline, "relay too slow"
        await asyncio.sleep(0.2)
    first_peak = vm_kb(relay.pid, "VmHWM")
    relay.kill()
    before_crash = await queue_depth(outbox.amqp_url, queue)
    relay = relays(outbox)
    assert await wait_until(lambda: outbox.confirmed_lag() < 64 * 1024, 600, 0.5)
    second_peak = vm_kb(relay.pid, "VmHWM")
    relayed = time.monotonic() - started
    total = await queue_depth(outbox.amqp_url, queue)
    # Now read every message back and check the transaction arrived whole.
    counter = await SeqCounter(outbox.amqp_url, queue, BIG_ROWS).start()
    try:
        assert await wait_until(lambda: counter.total >= total, 300, 0.5)
    finally:
        await counter.close()
    assert counter.missing() == 0, f"{counter.missing()} rows of the transaction never arrived"
    # The whole transaction is replayed from its start after the crash.
    assert counter.total >= BIG_ROWS + before_crash * 0.9
    line = (
        f"one {BIG_ROWS}-row transaction, kill -9 with {before_crash} queued: lost=0 "
        f"duplicates={counter.total - BIG_ROWS} insert={inserted:.0f}s relayed={relayed:.0f}s "
        f"relay peak RSS {first_peak // 1024} MB (first) / {second_peak // 1024} MB (second)"
    )
    VERDICTS.append(line)
    print(line)
    assert first_peak < 150 * 1024 and second_peak < 150 * 1024

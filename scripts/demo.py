"""`make demo`: the relay end to end on throwaway local servers.

Starts a private Postgres (wal_level=logical) and RabbitMQ node, runs
`cdc-relay init` and `cdc-relay run`, writes outbox rows inside application
transactions (one rolled back), shows them arriving with their latency, shows
`cdc-relay status`, stops the relay with SIGTERM and tears everything down.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
import psycopg

from cdc_relay.config import Settings
from devtools.consumer import Consumer
from devtools.relayproc import RelayProcess
from devtools.servers import PostgresServer, RabbitServer


def json(value: object) -> str:
    return orjson.dumps(value).decode()


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "cdc_relay.cli", *args]
    print("$ cdc-relay " + " ".join(args), flush=True)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    for line in (result.stdout + result.stderr).splitlines():
        print(f"    {line}")
    return result


async def consume(url: str, expected: int, sent_at: dict[str, float]) -> None:
    """Print each message as it arrives, with its commit-to-delivery latency."""
    consumer = await Consumer(url, "outbox", binding="order.#", queue="demo-orders").start()
    try:
        shown = 0
        deadline = time.monotonic() + 30
        while shown < expected and time.monotonic() < deadline:
            for message in consumer.deliveries[shown:]:
                latency = (message.received_at - sent_at.get(message.message_id, 0)) * 1e3
                print(
                    f"    received {message.routing_key:<22} id={message.message_id} "
                    f"body={orjson.loads(message.body)} ({latency:.1f} ms after commit)",
                    flush=True,
                )
                shown += 1
            await asyncio.sleep(0.01)
    finally:
        await consumer.close()


async def main() -> int:
    with tempfile.TemporaryDirectory(prefix="cdc-relay-demo-") as tmp:
        step("starting a throwaway Postgres (wal_level=logical) and RabbitMQ node")
        pg = PostgresServer()
        rabbit = RabbitServer()
        relay: RelayProcess | None = None
        try:
            pg.start()
            rabbit.start()
            print(f"    postgres: {pg.dsn}\n    rabbitmq: {rabbit.amqp_url}")
            env = dict(os.environ, CDC_RELAY_DSN=pg.dsn, CDC_RELAY_AMQP_URL=rabbit.amqp_url)

            step("cdc-relay init (twice: the second run changes nothing)")
            cli("init", env=env)
            cli("init", env=env)

            step("cdc-relay run (in the background)")
            settings = Settings(dsn=pg.dsn, amqp_urls=[rabbit.amqp_url])
            relay = RelayProcess(
                settings, Path(tmp) / "relay.log", log_level="INFO", stats_interval=5
            ).start()
            try:
                await relay.wait_for_log_async("streaming from slot")
            except AssertionError as exc:
                print(exc)
                return 1
            for line in relay.log().splitlines():
                print(f"    {line}")

            sent_at: dict[str, float] = {}
            consumer = asyncio.create_task(consume(rabbit.amqp_url, 4, sent_at))
            await asyncio.sleep(0.5)
            step("the application writes outbox rows inside its own transactions")
            with psycopg.connect(pg.dsn) as conn:
                insert = (
                    "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)"
                    " VALUES (%s, %s, %s, %s::jsonb) RETURNING id::text"
                )
                for order_id, event in [(1, "OrderCreated"), (1, "OrderPaid")]:
                    row = conn.execute(
                        insert, ("order", str(order_id), event, json({"order": order_id}))
                    ).fetchone()
                    conn.commit()
                    assert row is not None
                    sent_at[row[0]] = time.time()
                    print(f"    committed {event} for order {order_id}")
                conn.execute(insert, ("order", "666", "OrderCreated", json({"order": 666})))
                conn.rollback()
                print("    rolled back OrderCreated for order 666 (must never arrive)")
                ids = [
                    conn.execute(
                        insert, ("order", "2", event, json({"order": 2, "step": n}))
                    ).fetchone()
                    for n, event in enumerate(["OrderCreated", "OrderShipped"])
                ]
                conn.commit()
                for row in ids:
                    assert row is not None
                    sent_at[row[0]] = time.time()
                print("    committed OrderCreated + OrderShipped for order 2 in one transaction")
            step("messages arriving in RabbitMQ (queue demo-orders bound to order.#)")
            await asyncio.wait_for(consumer, 30)

            await asyncio.sleep(1.2)  # let the relay report its flush position
            step("cdc-relay status")
            cli("status", env=env)

            step("stopping the relay with SIGTERM (drains confirms, final flush, exit 0)")
            print(f"    relay exited with {relay.terminate(30)}")
            for line in relay.log().splitlines()[-2:]:
                print(f"    {line}")
            relay = None
            return 0
        finally:
            if relay is not None:
                relay.stop_quietly()
            step("tearing down the throwaway servers")
            rabbit.cleanup()
            pg.cleanup()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

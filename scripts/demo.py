"""`make demo`: the relay end to end on throwaway local servers.

Starts a private Postgres (wal_level=logical) and RabbitMQ node, runs
`cdc-relay init` and `cdc-relay run`, writes outbox rows inside application
transactions (one rolled back), shows them arriving with their latency, shows
`cdc-relay status`, stops the relay with SIGTERM and tears everything down.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aio_pika
import orjson
import psycopg

from cdc_relay.devservers import PostgresServer, RabbitServer


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
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange("outbox", "topic", durable=True)
        queue = await channel.declare_queue("demo-orders", durable=True)
        await queue.bind(exchange, "order.#")
        received = 0
        async with queue.iterator(timeout=30) as messages:
            async for message in messages:
                async with message.process():
                    latency = (time.monotonic() - sent_at.get(message.message_id or "", 0)) * 1e3
                    body = orjson.loads(message.body)
                    print(
                        f"    received {message.routing_key:<22} id={message.message_id} "
                        f"body={body} ({latency:.1f} ms after commit)",
                        flush=True,
                    )
                    received += 1
                    if received == expected:
                        return


async def main() -> int:
    with tempfile.TemporaryDirectory(prefix="cdc-relay-demo-") as tmp:
        step("starting a throwaway Postgres (wal_level=logical) and RabbitMQ node")
        pg = PostgresServer()
        rabbit = RabbitServer()
        relay: subprocess.Popen[bytes] | None = None
        try:
            pg.start()
            rabbit.start()
            print(f"    postgres: {pg.dsn}\n    rabbitmq: {rabbit.amqp_url}")
            env = dict(os.environ, CDC_RELAY_DSN=pg.dsn, CDC_RELAY_AMQP_URL=rabbit.amqp_url)

            step("cdc-relay init (twice: the second run changes nothing)")
            cli("init", env=env)
            cli("init", env=env)

            step("cdc-relay run (in the background)")
            log_path = Path(tmp) / "relay.log"
            with log_path.open("wb") as log:
                relay = subprocess.Popen(
                    [sys.executable, "-m", "cdc_relay.cli", "run", "--stats-interval", "5"],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            deadline = time.monotonic() + 30
            while "streaming from slot" not in log_path.read_text():
                if time.monotonic() > deadline or relay.poll() is not None:
                    print(log_path.read_text())
                    return 1
                await asyncio.sleep(0.05)
            for line in log_path.read_text().splitlines():
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
                    sent_at[row[0]] = time.monotonic()
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
                    sent_at[row[0]] = time.monotonic()
                print("    committed OrderCreated + OrderShipped for order 2 in one transaction")
            step("messages arriving in RabbitMQ (queue demo-orders bound to order.#)")
            await asyncio.wait_for(consumer, 30)

            await asyncio.sleep(1.2)  # let the relay report its flush position
            step("cdc-relay status")
            cli("status", env=env)

            step("stopping the relay with SIGTERM (drains confirms, final flush, exit 0)")
            relay.send_signal(signal.SIGTERM)
            print(f"    relay exited with {relay.wait(30)}")
            for line in log_path.read_text().splitlines()[-2:]:
                print(f"    {line}")
            relay = None
            return 0
        finally:
            if relay is not None:
                relay.kill()
            step("tearing down the throwaway servers")
            rabbit.cleanup()
            pg.cleanup()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

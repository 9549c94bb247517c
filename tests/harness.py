"""Shared helpers for integration tests: a relay subprocess, writers, a consumer.

The relay runs as a real OS process (``python -m cdc_relay.cli run``) so tests
can SIGTERM or SIGKILL it exactly as an orchestrator would.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import psycopg
from prometheus_client.parser import text_string_to_metric_families

from cdc_relay.config import Settings
from cdc_relay.pg import admin


def unique_names(prefix: str = "t") -> dict[str, str]:
    """Slot, publication, table and exchange names no other test uses."""
    tag = f"{prefix}_{uuid.uuid4().hex[:8]}"
    return {
        "slot": f"slot_{tag}",
        "publication": f"pub_{tag}",
        "table": f"public.outbox_{tag}",
        "exchange": f"ex_{tag}",
    }


@dataclass
class Setup:
    """An initialised outbox (table, publication, slot, exchange) for one test."""

    dsn: str
    amqp_url: str
    names: dict[str, str]
    settings: Settings = field(init=False)

    def __post_init__(self) -> None:
        self.settings = Settings(dsn=self.dsn, amqp_urls=[self.amqp_url], **self.names)

    @property
    def table(self) -> str:
        return self.names["table"]

    def init(self) -> list[str]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            return admin.init(conn, self.settings)

    def cleanup(self) -> None:
        with contextlib.suppress(Exception), psycopg.connect(self.dsn, autocommit=True) as conn:
            for _ in range(50):
                info = admin.slot_info(conn, self.names["slot"])
                if info is None or not info.active:
                    break
                time.sleep(0.1)
            admin.drop(conn, self.settings, publication=True)
            conn.execute(f"DROP TABLE IF EXISTS {self.table}")
            conn.execute(f"DROP TABLE IF EXISTS {self.table}_dead_letter")

    def cli_args(self) -> list[str]:
        return [
            "--dsn",
            self.dsn,
            "--amqp-url",
            self.amqp_url,
            "--slot",
            self.names["slot"],
            "--publication",
            self.names["publication"],
            "--table",
            self.table,
            "--exchange",
            self.names["exchange"],
        ]

    def insert(self, conn: psycopg.Connection[Any], rows: list[dict[str, Any]]) -> list[str]:
        """Insert rows in the caller's transaction; returns their ids."""
        ids = []
        with conn.cursor() as cur:
            for row in rows:
                cur.execute(
                    f"INSERT INTO {self.table} (aggregate_type, aggregate_id, event_type, payload,"
                    " headers, exchange, routing_key) VALUES (%s, %s, %s, %s, %s, %s, %s)"
                    " RETURNING id::text",
                    (
                        row.get("aggregate_type", "order"),
                        str(row.get("aggregate_id", "1")),
                        row.get("event_type", "Created"),
                        orjson.dumps(row.get("payload", {})).decode(),
                        orjson.dumps(row.get("headers", {})).decode(),
                        row.get("exchange"),
                        row.get("routing_key"),
                    ),
                )
                fetched = cur.fetchone()
                assert fetched is not None
                ids.append(fetched[0])
        return ids

    def confirmed_lag(self) -> int:
        """Bytes between the current WAL position and the slot's confirmed_flush_lsn."""
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            row = conn.execute(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint"
                " FROM pg_replication_slots WHERE slot_name = %s",
                (self.names["slot"],),
            ).fetchone()
        assert row is not None
        return int(row[0])

    def confirmed_flush(self) -> int:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            row = conn.execute(
                "SELECT pg_wal_lsn_diff(confirmed_flush_lsn, '0/0')::bigint"
                " FROM pg_replication_slots WHERE slot_name = %s",
                (self.names["slot"],),
            ).fetchone()
        assert row is not None
        return int(row[0])


class RelayProcess:
    """``cdc-relay run`` as a child process with its log in a file."""

    def __init__(self, setup: Setup, log_path: Path, *extra: str) -> None:
        self.setup = setup
        self.log_path = log_path
        self.extra = list(extra)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RelayProcess:
        args = [
            sys.executable,
            "-m",
            "cdc_relay.cli",
            "run",
            *self.setup.cli_args(),
            "--stats-interval",
            "2",
            "--log-level",
            "DEBUG",
            *self.extra,
        ]
        log = self.log_path.open("ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_log(self, text: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log():
                return
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"relay exited ({self.proc.returncode}):\n{self.log()}")
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not in relay log after {timeout}s:\n{self.log()[-4000:]}")

    async def wait_for_log_async(self, text: str, timeout: float = 30) -> None:
        """wait_for_log without blocking the event loop (proxies, consumers)."""
        await asyncio.to_thread(self.wait_for_log, text, timeout)

    def terminate(self, timeout: float = 30) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop_quietly(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@dataclass
class Delivery:
    message_id: str
    body: bytes
    routing_key: str
    headers: dict[str, Any]
    properties: dict[str, Any]
    redelivered: bool


class Consumer:
    """Collects every delivery from a queue bound to the test's exchange."""

    def __init__(
        self, amqp_url: str, exchange: str, binding: str = "#", queue: str | None = None
    ) -> None:
        self.amqp_url = amqp_url
        self.exchange = exchange
        self.binding = binding
        self.queue_name = queue or f"q_{exchange}"
        self.deliveries: list[Delivery] = []
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None

    async def start(self, arguments: dict[str, Any] | None = None) -> Consumer:
        self._connection = await aio_pika.connect_robust(self.amqp_url)
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=2000)
        exchange = await channel.declare_exchange(self.exchange, "topic", durable=True)
        queue = await channel.declare_queue(self.queue_name, durable=True, arguments=arguments)
        await queue.bind(exchange, self.binding)
        await queue.consume(self._on_message)
        return self

    async def _on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        self.deliveries.append(
            Delivery(
                message_id=message.message_id or "",
                body=message.body,
                routing_key=message.routing_key or "",
                headers=dict(message.headers),
                properties={
                    "content_type": message.content_type,
                    "delivery_mode": int(message.delivery_mode),
                    "type": message.type,
                    "app_id": message.app_id,
                    "timestamp": message.timestamp,
                },
                redelivered=bool(message.redelivered),
            )
        )
        await message.ack()

    def ids(self) -> list[str]:
        return [d.message_id for d in self.deliveries]

    async def wait_for(self, ids: set[str], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ids <= set(self.ids()):
                return
            await asyncio.sleep(0.05)
        missing = ids - set(self.ids())
        raise AssertionError(f"{len(missing)} of {len(ids)} messages missing after {timeout}s")

    async def settle(self, quiet: float = 1.0, timeout: float = 30) -> None:
        """Wait until no new delivery arrived for ``quiet`` seconds."""
        deadline = time.monotonic() + timeout
        count, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            if len(self.deliveries) != count:
                count, since = len(self.deliveries), time.monotonic()
            elif time.monotonic() - since >= quiet:
                return
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()


async def wait_until(predicate: Any, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(interval)
    return bool(predicate())


def parse_histogram(text: str, name: str) -> dict[str, float]:
    """The buckets (by ``le``), ``count`` and ``sum`` of one Prometheus histogram."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == name:
            for sample in family.samples:
                key = sample.labels.get("le") or sample.name.rsplit("_", 1)[1]
                found[key] = sample.value
    return found


async def metrics_text(port: int) -> str:
    """The relay's /metrics page."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    body = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return body.decode().split("\r\n\r\n", 1)[1]

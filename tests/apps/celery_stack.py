"""One outbox, one default relay and one REAL Celery worker (``task_acks_late=True``)
against the throwaway servers, shared by the tests of a module.

A worker boots in seconds, so each module starts one and its tests use their
own keys. Tasks are those of ``tests.apps.celery_app``.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import psycopg
import pytest

from cdc_relay import inbox
from tests.harness import RelayProcess, Setup, unique_names

ROOT = Path(__file__).resolve().parents[2]
RECORD = "tests.apps.celery_app.record"
RECORD_ONCE = "tests.apps.celery_app.record_once"


@dataclass
class Stack:
    setup: Setup
    relay: RelayProcess
    worker: subprocess.Popen[bytes]
    worker_log: Path
    queue: str
    effects: str
    inbox: str
    spans: Path  # the worker's OpenTelemetry spans, one JSON object per line

    @property
    def dsn(self) -> str:
        return self.setup.dsn

    def effects_of(self, key: str) -> list[tuple[str, Any]]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            rows = conn.execute(
                f"SELECT task_id, ran_at FROM {self.effects} WHERE key = %s ORDER BY ran_at",
                (key,),
            ).fetchall()
        return [(r[0], r[1]) for r in rows]

    def wait_for(self, keys: list[str], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self.effects_of(k) for k in keys):
                return
            if self.worker.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(
            f"tasks {keys} did not run; worker log:\n{self.worker_log.read_text()[-3000:]}"
            f"\nrelay log:\n{self.relay.log()[-3000:]}"
        )


async def _delete_queue(amqp_url: str, name: str) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(name)


def stop(relay: RelayProcess) -> None:
    """SIGTERM (a clean stop releases the slot at once), SIGKILL if that hangs."""
    if relay.proc is None or relay.proc.poll() is not None:
        return
    try:
        relay.terminate(timeout=15)
    except subprocess.TimeoutExpired:
        relay.stop_quietly()


def _server_url(request: pytest.FixtureRequest, env: str, fixture: str, attr: str) -> str:
    return os.environ.get(env) or getattr(request.getfixturevalue(fixture), attr)


@pytest.fixture(scope="module")
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    dsn = _server_url(request, "CDC_RELAY_TEST_DSN", "pg_server", "dsn")
    amqp_url = _server_url(request, "CDC_RELAY_TEST_AMQP_URL", "rabbit_server", "amqp_url")
    tmp = tmp_path_factory.mktemp("celery")
    names = unique_names("celery")
    tag = names["slot"].removeprefix("slot_")
    queue, effects, inbox_table = f"q_{tag}", f"public.effects_{tag}", f"public.inbox_{tag}"
    setup = Setup(dsn, amqp_url, names)
    setup.init()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            f"CREATE TABLE {effects} (key text NOT NULL, task_id text,"
            " ran_at timestamptz NOT NULL DEFAULT clock_timestamp())"
        )
        conn.execute(inbox.ddl(inbox_table))
    worker_log = tmp / "worker.log"
    env = dict(
        os.environ,
        CELERY_BROKER_URL=amqp_url,
        CDC_RELAY_TEST_WORKER_DSN=dsn,
        CDC_RELAY_TEST_EFFECTS=effects,
        CDC_RELAY_TEST_INBOX=inbox_table,
        CDC_RELAY_TEST_QUEUE=queue,
        CDC_RELAY_TEST_SPANS=str(tmp / "spans.jsonl"),
        PYTHONUNBUFFERED="1",
    )
    with worker_log.open("wb") as log:
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "tests.apps.celery_app",
                "worker",
                "--pool",
                "solo",
                "-Q",
                queue,
                "-n",
                f"{tag}@localhost",
                "--without-mingle",
                "--without-gossip",
                "--without-heartbeat",
                "--loglevel",
                "INFO",
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    relay = RelayProcess(setup, tmp / "relay.log").start()
    try:
        deadline = time.monotonic() + 60
        while b" ready." not in worker_log.read_bytes():
            assert worker.poll() is None, worker_log.read_text()
            assert time.monotonic() < deadline, worker_log.read_text()
            time.sleep(0.1)
        relay.wait_for_log("streaming from slot")
        yield Stack(
            setup, relay, worker, worker_log, queue, effects, inbox_table, tmp / "spans.jsonl"
        )
    finally:
        stop(relay)
        # SIGKILL: even a cold shutdown idles ~10 s here, and with acks_late nothing is lost.
        worker.kill()
        worker.wait(10)
        asyncio.run(_delete_queue(amqp_url, queue))
        setup.cleanup()
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {effects}")
            conn.execute(f"DROP TABLE IF EXISTS {inbox_table}")

"""The guides in docs/guides/ cannot rot: every Python block compiles, and every
complete example (a block with ``file=NAME``) runs against a real relay, in a
database of its own, and prints what its guide says it prints."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import orjson
import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from tests.harness import RelayProcess, Setup

ROOT = Path(__file__).resolve().parents[1]
GUIDES = ROOT / "docs" / "guides"
BLOCK = re.compile(r"^```python([^\n]*)\n(.*?)^```", re.M | re.S)


def blocks(guide: Path) -> list[tuple[str | None, str]]:
    """(file name or None, code) of each python block."""
    found = []
    for info, code in BLOCK.findall(guide.read_text()):
        match = re.search(r"file=(\S+)", info)
        found.append((match.group(1) if match else None, code))
    return found


def write_example(guide: Path, directory: Path) -> list[str]:
    names = []
    for name, code in blocks(guide):
        if name is None:
            continue
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.parent != directory:
            (path.parent / "__init__.py").touch()
        path.write_text(code)
        names.append(name)
    assert names, f"{guide.name} has no runnable example"
    return names


def test_there_is_a_guide_per_stack() -> None:
    assert {p.name for p in GUIDES.glob("*.md")} >= {
        "psycopg-asyncpg.md",
        "sqlalchemy.md",
        "django.md",
        "celery.md",
    }


@pytest.mark.parametrize("guide", sorted(GUIDES.glob("*.md")), ids=lambda p: p.name)
def test_every_python_block_compiles(guide: Path) -> None:
    for i, (name, code) in enumerate(blocks(guide)):
        compile(code, f"{guide.name}[{name or i}]", "exec")


@dataclass
class GuideEnv:
    dsn: str
    amqp_url: str
    setup: Setup
    directory: Path

    def env(self) -> dict[str, str]:
        return dict(
            os.environ,
            DATABASE_URL=self.dsn,
            AMQP_URL=self.amqp_url,
            PYTHONPATH=os.pathsep.join([str(self.directory), str(ROOT)]),
            PYTHONUNBUFFERED="1",
        )

    def run(self, script: str, timeout: float = 120) -> str:
        result = subprocess.run(
            [sys.executable, script],
            cwd=self.directory,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout


def with_database(dsn: str, database: str) -> str:
    """The same server, another database; a URL stays a URL (asyncpg reads only URLs)."""
    if "://" not in dsn:
        return make_conninfo(dsn, dbname=database)
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{database}"))


@pytest.fixture
def guide_env(pg_dsn: str, amqp_url: str, tmp_path: Path) -> Iterator[GuideEnv]:
    """A fresh database with the default outbox (public.outbox, exchange "outbox") and a relay."""
    database = f"guide_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {database}")
    dsn = with_database(pg_dsn, database)
    tag = database.removeprefix("guide_")
    names = {
        "slot": f"slot_guide_{tag}",
        "publication": f"pub_guide_{tag}",
        "table": "public.outbox",
        "exchange": "outbox",
    }
    setup = Setup(dsn, amqp_url, names)
    setup.init()
    example = tmp_path / "example"
    example.mkdir()
    relay = RelayProcess(setup, tmp_path / "relay.log").start()
    try:
        relay.wait_for_log("streaming from slot")
        yield GuideEnv(dsn, amqp_url, setup, example)
    finally:
        relay.stop_quietly()
        setup.cleanup()
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")


async def _delete_queue(amqp_url: str, name: str) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(name)


@pytest.mark.timeout(180)
def test_psycopg_asyncpg_guide(guide_env: GuideEnv) -> None:
    guide = GUIDES / "psycopg-asyncpg.md"
    write_example(guide, guide_env.directory)
    try:
        out = guide_env.run("shop.py")
    finally:
        asyncio.run(_delete_queue(guide_env.amqp_url, "billing"))
    assert out.strip() == "['OrderPlaced', 'OrderCancelled']"
    assert f"`{out.strip()}`" in guide.read_text()
    with psycopg.connect(guide_env.dsn, autocommit=True) as conn:
        invoices = conn.execute("SELECT count(*) FROM invoices").fetchone()
        processed = conn.execute("SELECT count(*) FROM processed_messages").fetchone()
    assert invoices == (1,) and processed == (2,)


@pytest.mark.timeout(180)
def test_sqlalchemy_guide(guide_env: GuideEnv) -> None:
    guide = GUIDES / "sqlalchemy.md"
    write_example(guide, guide_env.directory)
    out = guide_env.run("accounts.py")
    assert out.splitlines() == [
        'SignedUp {"email": "ada@example.org"}',
        'EmailChanged {"email": "ada@example.com"}',
    ]
    assert f"```\n{out}```" in guide.read_text()


@pytest.mark.timeout(180)
def test_celery_guide(guide_env: GuideEnv) -> None:
    guide = GUIDES / "celery.md"
    write_example(guide, guide_env.directory)
    log = guide_env.directory / "worker.log"
    with log.open("wb") as out:
        worker = subprocess.Popen(
            [
                *(sys.executable, "-m", "celery", "-A", "tasks", "worker", "--pool", "solo"),
                *("--without-mingle", "--without-gossip", "--without-heartbeat"),
                *("-n", f"guide-{uuid.uuid4().hex[:6]}@localhost", "--loglevel", "INFO"),
            ],
            cwd=guide_env.directory,
            env=guide_env.env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while b" ready." not in log.read_bytes():
            assert worker.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        printed = guide_env.run("producer.py")
    finally:
        worker.kill()  # a warm or cold shutdown idles ~10 s; acks_late loses nothing
        worker.wait(10)
        asyncio.run(_delete_queue(guide_env.amqp_url, "celery"))
    assert printed.strip() == "receipts for orders [1, 3]", log.read_text()
    assert f"`{printed.strip()}`" in guide.read_text()


async def _take_tasks(amqp_url: str, queue_name: str, quiet: float) -> list[aio_pika.Message]:
    connection = await aio_pika.connect(amqp_url)
    taken = []
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, durable=True)
        deadline = time.monotonic() + 60
        last = time.monotonic()
        while time.monotonic() < deadline and (not taken or time.monotonic() - last < quiet):
            message = await queue.get(fail=False)
            if message is None:
                await asyncio.sleep(0.1)
                continue
            await message.ack()
            taken.append(message)
            last = time.monotonic()
        await queue.delete()
    return taken


@pytest.mark.timeout(180)
def test_django_guide(guide_env: GuideEnv) -> None:
    guide = GUIDES / "django.md"
    write_example(guide, guide_env.directory)

    async def declare() -> None:
        connection = await aio_pika.connect(guide_env.amqp_url)
        async with connection:
            channel = await connection.channel()
            await channel.declare_queue("celery", durable=True)  # as a worker would

    asyncio.run(declare())
    out = guide_env.run("run.py")
    order_id = int(out.split()[1])
    assert out.strip() == f"order {order_id} placed; the invalid one rolled back with its task"
    tasks = asyncio.run(_take_tasks(guide_env.amqp_url, "celery", quiet=2.0))
    assert [(m.headers["task"], orjson.loads(m.body)[0]) for m in tasks] == [
        ("shop.tasks.send_confirmation", [order_id])
    ]
    assert guide_env.setup.confirmed_lag() >= 0

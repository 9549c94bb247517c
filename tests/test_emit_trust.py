"""Emitted messages have the outbox table's trust boundary (issue 16).

Every forgery is tried as a role with ``LOGIN`` and nothing else, against a relay
running as its least-privilege role (``init --grant-to``): calling the emit
function is refused, a message written with ``pg_logical_emit_message`` directly
is dead-lettered (never published), and an outbox that does not use emitted
messages never even receives them.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import psycopg
import pytest
import pytest_asyncio
from psycopg import sql
from psycopg.conninfo import make_conninfo

from cdc_relay.config import Settings
from cdc_relay.emitauth import EMIT_AUTH_FAILED
from cdc_relay.errors import ConfigError
from cdc_relay.pg import checks, report
from cdc_relay.pg import setup as pg_setup
from cdc_relay.schema import EMIT_SIGNATURE, emit_key_table, function_names, qualified
from tests.harness import Consumer, RelayProcess, Setup, run_cli, unique_names, wait_until

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Roles:
    setup: Setup
    relay: str  # LOGIN REPLICATION, given what init --grant-to grants
    app: str  # LOGIN, given EXECUTE on the emit function by init --grant-emit-to
    nobody: str  # LOGIN and nothing else

    def dsn(self, role: str) -> str:
        return make_conninfo(self.setup.dsn, user=role)

    def relay_settings(self) -> Settings:
        return Settings(
            dsn=self.dsn(self.relay), amqp_urls=[self.setup.amqp_url], **self.setup.names
        )


def make_roles(pg_dsn: str, amqp_url: str, tag: str, *, emit: bool) -> Roles:
    setup = Setup(pg_dsn, amqp_url, unique_names(tag))
    suffix = uuid.uuid4().hex[:6]
    roles = Roles(setup, f"relay_{suffix}", f"app_{suffix}", f"nobody_{suffix}")
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN REPLICATION").format(sql.Identifier(roles.relay))
        )
        for role in (roles.app, roles.nobody):
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    init_args = ["--grant-emit-to", roles.app] if emit else []
    done = run_cli(
        "init", "--grant-to", roles.relay, *init_args, *setup.cli_args("init"), timeout=90
    )
    assert done.returncode == 0, done.stderr
    return roles


def drop_roles(roles: Roles) -> None:
    roles.setup.cleanup()
    schema, _ = roles.setup.settings.table_parts
    with psycopg.connect(roles.setup.dsn, autocommit=True) as conn:
        for name in function_names(roles.setup.settings.table_parts):
            conn.execute(f"DROP FUNCTION IF EXISTS {schema}.{name}")
        for role in (roles.relay, roles.app, roles.nobody):
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


@pytest.fixture
def emitting(pg_dsn: str, amqp_url: str) -> Iterator[Roles]:
    """An outbox whose application emits: init --grant-emit-to the app role."""
    roles = make_roles(pg_dsn, amqp_url, "trust", emit=True)
    yield roles
    drop_roles(roles)


@pytest.fixture
def table_only(pg_dsn: str, amqp_url: str) -> Iterator[Roles]:
    """An outbox that does not use emitted messages: a plain init."""
    roles = make_roles(pg_dsn, amqp_url, "plain", emit=False)
    yield roles
    drop_roles(roles)


@pytest_asyncio.fixture
async def queues(amqp_url: str) -> AsyncIterator[dict[str, str]]:
    """A queue bound to amq.topic for one routing key, and a named (Celery) queue."""
    tag = uuid.uuid4().hex[:8]
    names = {"topic_key": f"forged.{tag}", "topic": f"q_topic_{tag}", "tasks": f"q_tasks_{tag}"}
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        topic = await channel.declare_queue(names["topic"])
        await topic.bind("amq.topic", names["topic_key"])
        await channel.declare_queue(names["tasks"])
        yield names
        for name in (names["topic"], names["tasks"]):
            await channel.queue_delete(name)


async def queue_depth(amqp_url: str, queue: str) -> int:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        count = declared.declaration_result.message_count
        return int(count or 0)


def forged_rows(real_id: str, queues: dict[str, str]) -> list[dict[str, Any]]:
    """The issue's forgeries: a real row's id, amq.topic with any key, a Celery task."""
    base = {"aggregate_id": "x", "headers": "{}", "created_at": "2024-01-01T00:00:00+00:00"}
    return [
        {**base, "id": real_id, "aggregate_type": "order", "event_type": "Forged",
         "payload": '{"forged": "same id"}', "exchange": None, "routing_key": None},
        {**base, "id": str(uuid.uuid4()), "aggregate_type": "order", "event_type": "Forged",
         "payload": '{"forged": "topic"}', "exchange": "amq.topic",
         "routing_key": queues["topic_key"]},
        {**base, "id": str(uuid.uuid4()), "aggregate_type": "celery.task",
         "event_type": "app.tasks.delete_all", "payload": '{"args": [], "kwargs": {}}',
         "exchange": "", "routing_key": queues["tasks"]},
    ]  # fmt: skip


def forge(roles: Roles, contents: list[str]) -> None:
    """As the LOGIN-only role: pg_logical_emit_message with the relay's prefix."""
    prefix = roles.setup.settings.message_prefix
    with psycopg.connect(roles.dsn(roles.nobody)) as conn:
        for content in contents:
            conn.execute("SELECT pg_logical_emit_message(true, %s, %s)", (prefix, content))
        conn.commit()


def dead_letters(roles: Roles) -> list[tuple[str, str]]:
    with psycopg.connect(roles.setup.dsn, autocommit=True) as conn:
        rows = conn.execute(
            sql.SQL("SELECT reason, row_data::text FROM {} ORDER BY id").format(
                qualified(*roles.setup.settings.dead_letter_table)
            )
        ).fetchall()
    return [(r[0], r[1]) for r in rows]


def test_a_login_only_role_cannot_call_emit_or_read_the_key(emitting: Roles) -> None:
    schema, _ = emitting.setup.settings.table_parts
    emit = f"{schema}.{function_names(emitting.setup.settings.table_parts)[1]}"
    keys = ".".join(emit_key_table(emitting.setup.settings.table_parts))
    with psycopg.connect(emitting.dsn(emitting.nobody), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
            conn.execute(f"SELECT {emit}('order', '1', 'Forged', '{{}}')")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
            conn.execute(f"SELECT key FROM {keys}")
    with psycopg.connect(emitting.dsn(emitting.app), autocommit=True) as conn:
        row = conn.execute(f"SELECT {emit}('order', '1', 'Allowed', '{{}}')").fetchone()
        assert row is not None and isinstance(row[0], uuid.UUID)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):  # the app cannot sign either
            conn.execute(f"SELECT key FROM {keys}")


@pytest.mark.asyncio
async def test_forged_messages_are_dead_lettered_and_reach_no_queue(
    emitting: Roles, queues: dict[str, str], tmp_path: Path
) -> None:
    setup = emitting.setup
    consumer = await Consumer(setup.amqp_url, setup.names["exchange"]).start()
    relay = RelayProcess(emitting.relay_settings(), tmp_path / "relay.log").start()
    try:
        await relay.wait_for_log_async("streaming from slot")
        with psycopg.connect(setup.dsn) as conn:
            (real,) = setup.insert(conn, [{"aggregate_id": "real"}])
            conn.commit()
        forgeries = forged_rows(real, queues)
        contents = [orjson.dumps(f).decode() for f in forgeries]
        contents.append("0" * 64 + contents[1])  # a made-up signature
        forge(emitting, contents)
        schema, _ = setup.settings.table_parts
        emit = f"{schema}.{function_names(setup.settings.table_parts)[1]}"
        with psycopg.connect(emitting.dsn(emitting.app)) as conn:
            row = conn.execute(f"SELECT {emit}('order', 'm', 'Marker', '{{}}')::text").fetchone()
            conn.commit()
        assert row is not None
        marker = row[0]
        await consumer.wait_for({real, marker}, timeout=30)
        assert await wait_until(lambda: len(dead_letters(emitting)) == len(contents), 30, 0.3)
        await consumer.settle(1.0)
    finally:
        relay.stop_quietly()
        await consumer.close()
    assert sorted(consumer.ids()) == sorted([real, marker])  # the real row once, no forgery
    bodies = [d.body for d in consumer.deliveries]
    assert not any(b"forged" in body for body in bodies), bodies
    assert await queue_depth(setup.amqp_url, queues["topic"]) == 0
    assert await queue_depth(setup.amqp_url, queues["tasks"]) == 0
    letters = dead_letters(emitting)
    assert [reason for reason, _ in letters] == [EMIT_AUTH_FAILED] * len(contents)
    assert "app.tasks.delete_all" in letters[2][1]


@pytest.mark.asyncio
async def test_an_outbox_without_emit_never_receives_logical_messages(
    table_only: Roles, tmp_path: Path
) -> None:
    setup = table_only.setup
    consumer = await Consumer(setup.amqp_url, setup.names["exchange"]).start()
    relay = RelayProcess(table_only.relay_settings(), tmp_path / "relay.log").start()
    try:
        await relay.wait_for_log_async("streaming from slot")
        forged = str(uuid.uuid4())
        row = {**forged_rows(forged, {"topic_key": "k", "tasks": "t"})[0], "payload": "{}"}
        forge(table_only, [orjson.dumps(row).decode()])
        with psycopg.connect(setup.dsn) as conn:
            (marker,) = setup.insert(conn, [{"aggregate_id": "marker"}])
            conn.commit()
        await consumer.wait_for({marker}, timeout=30)
        await consumer.settle(1.0)
        await asyncio.sleep(0.5)
    finally:
        relay.stop_quietly()
        await consumer.close()
    assert consumer.ids() == [marker]
    assert dead_letters(table_only) == []  # not even decoded: pgoutput was not asked for them


def test_an_older_public_emit_function_is_refused_until_init_replaces_it(
    table_only: Roles,
) -> None:
    """The upgrade path: one line naming the command, then init makes it safe."""
    setup = table_only.setup
    schema, _ = setup.settings.table_parts
    emit = f"{schema}.{function_names(setup.settings.table_parts)[1]}"
    with psycopg.connect(setup.dsn, autocommit=True) as conn:
        conn.execute(OLD_EMIT.replace("{emit}", emit))  # what init wrote before issue 16
        with pytest.raises(ConfigError, match=r"init --grant-emit-to ROLE"):
            checks.validate(conn, setup.settings)
        assert any("older cdc-relay" in line for line in pg_setup.init(conn, setup.settings))
        with pytest.raises(ConfigError, match="older cdc-relay"):
            checks.validate(conn, setup.settings)  # a plain init leaves it alone
    done = run_cli("run", *setup.cli_args(), timeout=60)
    assert done.returncode == 78, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "older cdc-relay" in done.stderr
    with psycopg.connect(setup.dsn, autocommit=True) as conn:
        pg_setup.init(conn, setup.settings, grant_emit_to=[table_only.app])
        facts = checks.validate(conn, setup.settings)
        assert facts.emit_key is not None
        public = conn.execute(
            f"SELECT has_function_privilege('public', '{emit}(text, text, text, jsonb, jsonb,"
            " text, text)', 'EXECUTE')"
        ).fetchone()
        assert public == (False,)


def test_status_warns_about_what_the_relay_cannot_enforce(emitting: Roles) -> None:
    setup = emitting.setup
    schema, _ = setup.settings.table_parts
    emit = f"{schema}.{function_names(setup.settings.table_parts)[1]}"
    with psycopg.connect(setup.dsn, autocommit=True) as conn:
        warnings = report.status(conn, setup.settings, require_active=False).warnings
        assert any("any role may call pg_logical_emit_message" in w for w in warnings)
        assert not any("executable by PUBLIC" in w for w in warnings), warnings
        conn.execute(f"GRANT EXECUTE ON FUNCTION {emit}{EMIT_SIGNATURE} TO PUBLIC")
        warnings = report.status(conn, setup.settings, require_active=False).warnings
        assert any(f"{emit} is executable by PUBLIC" in w for w in warnings), warnings


OLD_EMIT = """
CREATE OR REPLACE FUNCTION {emit}(
    aggregate_type text, aggregate_id text, event_type text, payload jsonb,
    headers jsonb DEFAULT '{}', exchange text DEFAULT NULL, routing_key text DEFAULT NULL
) RETURNS uuid LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    new_id uuid := gen_random_uuid();
BEGIN
    PERFORM pg_logical_emit_message(true, 'cdc_relay', jsonb_build_object(
        'id', new_id, 'aggregate_type', $1, 'aggregate_id', $2, 'event_type', $3,
        'payload', $4::text, 'headers', coalesce($5, '{}')::text, 'exchange', $6,
        'routing_key', $7, 'created_at', now())::text);
    RETURN new_id;
END
$fn$;
"""

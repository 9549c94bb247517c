"""`dead-letters replay` converges and applies the one publishing policy (issue 16).

Dead letters are inserted by hand (as the relay stores them), replayed with the
real command against real Postgres and RabbitMQ, and the deliveries counted.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import orjson
import psycopg
import pytest
import pytest_asyncio

from cdc_relay import deadletters
from cdc_relay import replay as replays
from cdc_relay.deadletters import DeadLetterRecord
from cdc_relay.replay import ReplayBusy, TruncatedRow, group_by_outbox_row, row_from_record
from devtools.amqp import queue_depth
from tests.harness import Consumer, Setup, run_cli


def stored_row(outbox_id: str, **overrides: Any) -> dict[str, Any]:
    """A dead letter's row_data, as OutboxRow.as_dict stores it."""
    row: dict[str, Any] = {
        "id": outbox_id,
        "aggregate_type": "order",
        "aggregate_id": "1",
        "event_type": "Created",
        "payload": '{"n": 1}',
        "headers": None,
        "exchange": None,
        "routing_key": None,
        "created_at": None,
    }
    row.update(overrides)
    return row


def record(id_: int, outbox_id: str | None, **row: Any) -> DeadLetterRecord:
    data = stored_row(outbox_id or "x", **row)
    return DeadLetterRecord(id_, outbox_id, "r", data, "0/1", "now", None)


# -- pure parts -------------------------------------------------------------------------


def test_dead_letters_of_one_outbox_row_are_one_group() -> None:
    groups = group_by_outbox_row(
        [record(3, "a"), record(1, "a"), record(2, "b"), record(4, None), record(5, None)]
    )
    assert [(g.lead.id, [r.id for r in g.records]) for g in groups] == [
        (1, [1, 3]),
        (2, [2]),
        (4, [4]),
        (5, [5]),
    ]


def test_a_whole_stored_row_leads_its_group_before_a_truncated_one() -> None:
    cut = record(1, "a", payload='{"n": "xx', truncated=["payload"])
    (group,) = group_by_outbox_row([cut, record(2, "a")])
    assert group.lead.id == 2 and [r.id for r in group.records] == [1, 2]
    with pytest.raises(TruncatedRow, match=r"truncated field.*payload"):
        row_from_record(cut)
    assert row_from_record(record(2, "a")).payload == b'{"n": 1}'
    assert row_from_record(record(3, "a", truncated=[])).payload == b'{"n": 1}'


# -- against the servers ------------------------------------------------------------------


@pytest_asyncio.fixture
async def events(outbox: Setup) -> AsyncIterator[Consumer]:
    """Every message that reaches the outbox's exchange."""
    consumer = await Consumer(outbox.amqp_url, outbox.names["exchange"]).start()
    yield consumer
    await consumer.close()


def add_dead_letters(setup: Setup, rows: list[dict[str, Any]]) -> list[int]:
    with psycopg.connect(setup.dsn, autocommit=True) as conn:
        return [
            conn.execute(
                f"INSERT INTO {setup.table}_dead_letter (outbox_id, reason, row_data, lsn)"
                " VALUES (%s, 'test', %s, '0/1') RETURNING id",
                (row["id"], orjson.dumps(row).decode()),
            ).fetchone()[0]  # type: ignore[index]
            for row in rows
        ]


def pending(setup: Setup) -> list[str]:
    with psycopg.connect(setup.dsn, autocommit=True) as conn:
        records = deadletters.list_dead_letters(conn, setup.settings.dead_letter_table)
    return [r.outbox_id or "" for r in records]


async def replay(setup: Setup, *extra: str, env: dict[str, str] | None = None) -> Any:
    return await asyncio.to_thread(
        run_cli, "dead-letters", "replay", *setup.cli_args("dead-letters replay"), *extra, env=env
    )


async def settle(consumer: Consumer, count: int) -> list[str]:
    await consumer.wait_for(set(consumer.ids()), timeout=5)
    deadline = asyncio.get_running_loop().time() + 10
    while len(consumer.ids()) < count and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    await consumer.settle(quiet=0.5)
    return consumer.ids()


@pytest.mark.asyncio
async def test_replay_applies_allowed_exchanges_from_the_environment(
    outbox: Setup, events: Consumer
) -> None:
    """Rows dead-lettered because of their exchange used to be replayed to it.

    One names amq.topic, one is a Celery task for the default exchange (any
    queue by name): with CDC_RELAY_ALLOWED_EXCHANGES set, neither is published.
    """
    leak = f"q_leak_{outbox.names['slot']}"
    connection = await aio_pika.connect(outbox.amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(leak, auto_delete=False)
        await queue.bind("amq.topic", "#")
        ok, forbidden, task = (str(uuid.uuid4()) for _ in range(3))
        add_dead_letters(
            outbox,
            [
                stored_row(ok),
                stored_row(forbidden, exchange="amq.topic"),
                stored_row(
                    task, aggregate_type="celery.task", payload='{"args": []}', routing_key=leak
                ),
            ],
        )
        env = {"CDC_RELAY_ALLOWED_EXCHANGES": outbox.names["exchange"]}
        result = await replay(outbox, env=env)
        assert result.returncode == 1, result.stderr
        assert "1 replayed, 2 failed" in result.stderr, (result.stdout, result.stderr)
        assert "exchange 'amq.topic' is not allowed" in result.stdout
        assert "default exchange '' is not allowed" in result.stdout
        assert await settle(events, 1) == [ok]
        assert await queue_depth(outbox.amqp_url, leak) == 0
        assert sorted(pending(outbox)) == sorted([forbidden, task])
        await channel.queue_delete(leak)


@pytest.mark.asyncio
async def test_a_missing_exchange_fails_only_its_rows_and_replay_converges(
    outbox: Setup, events: Consumer
) -> None:
    """7 good, one to a missing exchange, 7 good: 14 replayed once, then nothing again."""
    ids = [str(uuid.uuid4()) for _ in range(15)]
    rows = [stored_row(i) for i in ids]
    rows[7]["exchange"] = f"missing_{outbox.names['slot']}"
    add_dead_letters(outbox, rows)
    first = await replay(outbox)
    assert "14 replayed, 1 failed" in first.stderr, (first.stdout, first.stderr)
    # Not on a terminal: the progress is one summary line with the rate.
    assert "replayed 15 dead letter(s) in " in first.stderr, first.stderr
    assert "404" in first.stdout and "missing_" in first.stdout
    good = ids[:7] + ids[8:]
    assert sorted(await settle(events, 14)) == sorted(good)
    second = await replay(outbox)
    assert "0 replayed, 1 failed" in second.stderr, second.stderr
    await asyncio.sleep(1)
    assert sorted(events.ids()) == sorted(good)  # nothing delivered twice
    assert pending(outbox) == [ids[7]]


@pytest.mark.asyncio
async def test_an_outbox_row_dead_lettered_twice_is_published_once(
    outbox: Setup, events: Consumer
) -> None:
    twice, once = str(uuid.uuid4()), str(uuid.uuid4())
    add_dead_letters(outbox, [stored_row(twice), stored_row(once), stored_row(twice)])
    result = await replay(outbox)
    assert "3 replayed, 0 failed" in result.stderr, (result.stdout, result.stderr)
    assert sorted(await settle(events, 2)) == sorted([twice, once])
    again = await replay(outbox)
    assert again.returncode == 0 and "nothing to replay" in again.stderr, again.stderr
    await asyncio.sleep(1)
    assert sorted(events.ids()) == sorted([twice, once])


@pytest.mark.asyncio
async def test_siblings_in_later_rounds_are_published_once(outbox: Setup, events: Consumer) -> None:
    """Rounds of 2: the sibling of a row from round one is not sent again in round three."""
    a, b, c = (str(uuid.uuid4()) for _ in range(3))
    add_dead_letters(outbox, [stored_row(a), stored_row(b), stored_row(c), stored_row(a)])
    with psycopg.connect(outbox.dsn, autocommit=True) as conn:
        results = await replays.replay(conn, outbox.settings, batch=2)
    assert [r.error for r in results] == [None] * 4
    assert sorted(await settle(events, 3)) == sorted([a, b, c])
    assert pending(outbox) == []


@pytest.mark.asyncio
async def test_a_second_replay_at_once_refuses_in_one_line(outbox: Setup, events: Consumer) -> None:
    add_dead_letters(outbox, [stored_row(str(uuid.uuid4()))])
    table = outbox.settings.dead_letter_table
    with psycopg.connect(outbox.dsn, autocommit=True) as holder:
        replays._claim(holder, table)  # a replay that is running
        result = await replay(outbox)
        assert result.returncode == 1, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "another dead-letters replay is running" in lines[0]
        assert f"pid {holder.info.backend_pid}" in lines[0]
        with psycopg.connect(outbox.dsn, autocommit=True) as conn, pytest.raises(ReplayBusy):
            await replays.replay(conn, outbox.settings)
    assert events.ids() == []
    result = await replay(outbox)  # the holder is gone: its lock with it
    assert "1 replayed, 0 failed" in result.stderr, result.stderr


@pytest.mark.asyncio
async def test_a_truncated_dead_letter_is_published_from_the_outbox_row(
    outbox: Setup, events: Consumer
) -> None:
    with psycopg.connect(outbox.dsn) as conn:
        (kept,) = outbox.insert(conn, [{"payload": {"big": "y" * 5000}}])
        conn.commit()
    gone = str(uuid.uuid4())
    add_dead_letters(
        outbox,
        [
            stored_row(kept, payload='{"big": "yyy', truncated=["payload"]),
            stored_row(gone, payload='{"big": "zzz', truncated=["payload"]),
        ],
    )
    result = await replay(outbox)
    assert "1 replayed, 1 failed" in result.stderr, (result.stdout, result.stderr)
    assert "truncated field(s) payload" in result.stdout and "no longer in" in result.stdout
    await settle(events, 1)
    (delivery,) = events.deliveries
    assert delivery.message_id == kept
    assert orjson.loads(delivery.body) == {"big": "y" * 5000}
    assert pending(outbox) == [gone]


@pytest.mark.asyncio
async def test_replay_refuses_a_body_over_max_message_size(outbox: Setup, events: Consumer) -> None:
    small, big = str(uuid.uuid4()), str(uuid.uuid4())
    add_dead_letters(
        outbox, [stored_row(small), stored_row(big, payload='{"k": "' + "b" * 500 + '"}')]
    )
    result = await replay(outbox, "--max-message-size", "100")
    assert "1 replayed, 1 failed" in result.stderr, (result.stdout, result.stderr)
    assert "exceeds the maximum message size 100" in result.stdout
    assert await settle(events, 1) == [small]


def add_dated_dead_letters(setup: Setup, letters: list[tuple[str, str, str]]) -> list[str]:
    """Dead letters with a reason and a dead-lettering time each; returns their outbox ids."""
    ids = []
    with psycopg.connect(setup.dsn, autocommit=True) as conn:
        for reason, created_at, exchange in letters:
            row = stored_row(str(uuid.uuid4()), exchange=exchange or None)
            conn.execute(
                f"INSERT INTO {setup.table}_dead_letter (outbox_id, reason, row_data, lsn,"
                " created_at) VALUES (%s, %s, %s, '0/1', %s)",
                (row["id"], reason, orjson.dumps(row).decode(), created_at),
            )
            ids.append(row["id"])
    return ids


def json_lines(stdout: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in stdout.splitlines()]


@pytest.mark.asyncio
async def test_filters_and_dry_run_select_exactly_the_rows_they_say(
    outbox: Setup, events: Consumer
) -> None:
    """--reason, --since/--until and --limit narrow the same way with and without --dry-run."""
    ids = add_dated_dead_letters(
        outbox,
        [
            ("NO_ROUTE: nobody bound", "2026-12-01 09:00+00", ""),  # before the window
            ("NO_ROUTE: nobody bound", "2026-12-01 10:00+00", ""),  # in: the --since bound
            ("headers must be a JSON object", "2026-12-01 10:30+00", ""),  # wrong reason
            ("no_route again", "2026-12-01 11:00+00", ""),  # in (any case)
            ("NO_ROUTE: nobody bound", "2026-12-01 11:30+00", ""),  # in, but over --limit 2
            ("NO_ROUTE: nobody bound", "2026-12-01 12:00+00", ""),  # the --until bound: out
        ],
    )
    narrow = ["--reason", "No_Route", "--since", "2026-12-01T10:00:00Z"]
    narrow += ["--until", "2026-12-01 12:00", "--limit", "2"]
    dry = await replay(outbox, *narrow, "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    planned = json_lines(dry.stdout)
    assert [p["outbox_id"] for p in planned] == [ids[1], ids[3]]
    assert {p["outcome"] for p in planned} == {"would_replay"}
    assert {p["exchange"] for p in planned} == {outbox.names["exchange"]}
    assert "dry run: 2 would be replayed, 0 would fail" in dry.stderr
    await asyncio.sleep(0.5)
    assert events.ids() == [] and sorted(pending(outbox)) == sorted(ids)  # nothing happened

    unlimited = await replay(outbox, *narrow[:-2], "--dry-run", "--json")
    assert [p["outbox_id"] for p in json_lines(unlimited.stdout)] == [ids[1], ids[3], ids[4]]
    redirected = await replay(
        outbox,
        "--id",
        str(planned[0]["id"]),
        "--to-routing-key",
        "elsewhere.key",
        "--dry-run",
        "--json",
    )
    (moved,) = json_lines(redirected.stdout)
    assert (moved["outbox_id"], moved["routing_key"]) == (ids[1], "elsewhere.key")

    done = await replay(outbox, *narrow, "--json")
    assert done.returncode == 0, done.stderr
    assert [(r["outbox_id"], r["outcome"]) for r in json_lines(done.stdout)] == [
        (ids[1], "replayed"),
        (ids[3], "replayed"),
    ]
    assert sorted(await settle(events, 2)) == sorted([ids[1], ids[3]])
    assert sorted(pending(outbox)) == sorted([ids[0], ids[2], ids[4], ids[5]])


@pytest.mark.asyncio
async def test_dead_letters_list_has_a_header_and_nested_json(outbox: Setup) -> None:
    (outbox_id,) = add_dated_dead_letters(outbox, [("NO_ROUTE", "2026-12-01 10:00+00", "")])
    text = await asyncio.to_thread(
        run_cli, "dead-letters", "list", *outbox.cli_args("dead-letters list")
    )
    header, line = text.stdout.splitlines()
    assert header.split("\t") == ["id", "outbox_id", "created_at", "state", "reason"]
    assert line.split("\t")[1:] == [outbox_id, "2026-12-01T10:00:00.000000Z", "pending", "NO_ROUTE"]
    listed = await asyncio.to_thread(
        run_cli, "dead-letters", "list", "--json", *outbox.cli_args("dead-letters list")
    )
    (shown,) = json_lines(listed.stdout)
    assert shown["created_at"] == "2026-12-01T10:00:00.000000Z"
    assert shown["row"]["payload"] == {"n": 1} and shown["row"]["id"] == outbox_id

"""Several outboxes on one slot (``--config relay.toml``), against real servers.

Three outbox tables share one slot and one publication; each is relayed to its
own exchange in its own commit order, a table whose exchange does not exist
dead-letters its rows into its own dead-letter table while the others flow,
and a kill -9 loop loses nothing.
"""

from __future__ import annotations

import asyncio
import random
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
import pytest_asyncio

from cdc_relay.errors import EX_CONFIG
from devtools.metrics import readyz
from devtools.servers import free_port
from tests.faults import Workload, verify
from tests.harness import (
    Consumer,
    RelayProcess,
    Setup,
    metrics_text,
    run_cli,
    unique_names,
    wait_until,
)

pytestmark = pytest.mark.asyncio


class FileRelay(RelayProcess):
    """``cdc-relay run --config FILE``: every setting comes from the file (and ``extra``)."""

    def __init__(self, config: Path, log_path: Path, *extra: str, **kwargs: Any) -> None:
        self.config = config
        super().__init__(Multi.placeholder, log_path, *extra, **kwargs)

    def args(self) -> list[str]:
        args = [sys.executable, "-m", "cdc_relay.cli", "--log-level", self.log_level]
        args += ["run", "--config", str(self.config), "--stats-interval", "2"]
        if self.metrics_port is not None:
            args += ["--metrics-port", str(self.metrics_port)]
        return [*args, *self.extra]


class Multi:
    """Three outboxes (tables, exchanges) on one slot and publication, and their relay file."""

    placeholder: Any = None

    def __init__(self, dsn: str, amqp_url: str, path: Path, *, declare: bool = True) -> None:
        shared = unique_names("mlt")
        self.setups = []
        for letter in "abc":
            names = unique_names(f"m{letter}")
            names.update(slot=shared["slot"], publication=shared["publication"])
            self.setups.append(Setup(dsn, amqp_url, names))
        Multi.placeholder = self.setups[0].settings
        self.path = path
        self.slot = shared["slot"]
        lines = [
            f"dsn = {orjson.dumps(dsn).decode()}",
            f"amqp_url = [{orjson.dumps(amqp_url).decode()}]",
            f'slot = "{shared["slot"]}"',
            f'publication = "{shared["publication"]}"',
            f"declare = {'true' if declare else 'false'}",
            "max_in_flight = 500",
        ]
        for setup in self.setups:
            lines += ["", "[[outbox]]", f'table = "{setup.table}"']
            lines.append(f'exchange = "{setup.names["exchange"]}"')
        path.write_text("\n".join(lines) + "\n")

    def cli(self, *args: str) -> Any:
        command, rest = args[0], list(args[1:])
        if command == "dead-letters":
            command, rest = f"dead-letters {rest[0]}", rest[1:]
        return run_cli(*command.split(), "--config", str(self.path), *rest)

    def cleanup(self) -> None:
        for setup in self.setups:
            setup.cleanup()


@pytest.fixture
def multi(pg_dsn: str, amqp_url: str, tmp_path: Path) -> Iterator[Multi]:
    setup = Multi(pg_dsn, amqp_url, tmp_path / "relay.toml")
    yield setup
    setup.cleanup()


@pytest.fixture
def file_relays(tmp_path: Path) -> Iterator[Callable[..., FileRelay]]:
    started: list[FileRelay] = []

    def start(config: Path, *extra: str, metrics_port: int | None = None) -> FileRelay:
        log = tmp_path / f"relay-{len(started)}.log"
        relay = FileRelay(config, log, *extra, metrics_port=metrics_port).start()
        started.append(relay)
        return relay

    yield start
    for relay in started:
        relay.stop_quietly()
        print(f"--- {relay.log_path.name} ---\n{relay.log_tail(6000)}")


@pytest_asyncio.fixture
async def consumers(multi: Multi) -> AsyncIterator[list[Consumer]]:
    started = [await Consumer(s.amqp_url, s.names["exchange"]).start() for s in multi.setups]
    yield started
    for consumer in started:
        await consumer.close()


def published_tables(dsn: str, publication: str) -> set[str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = %s",
            (publication,),
        ).fetchall()
    return {r[0] for r in rows}


def metric(text: str, name: str, **labels: str) -> float | None:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(f"{name}{{{wanted}}} "):
            return float(line.rsplit(" ", 1)[1])
    return None


async def test_init_and_status_with_a_file_of_three_outboxes(multi: Multi, tmp_path: Path) -> None:
    before = multi.cli("run")
    assert before.returncode == EX_CONFIG, before.stderr
    assert before.stderr.count("\n") == 1 and "does not exist" in before.stderr
    assert "init --config" in before.stderr
    first = multi.cli("init", "--no-inbox")
    assert first.returncode == 0, first.stderr
    for setup in multi.setups:
        assert f"table {setup.table}: created" in first.stdout
        assert f"dead-letter table {setup.table}_dead_letter: created" in first.stdout
        assert f"exchange {setup.names['exchange']}: created" in first.stdout
    assert f"replication slot {multi.slot}: created" in first.stdout
    publication = multi.setups[0].names["publication"]
    assert published_tables(multi.setups[0].dsn, publication) == {s.table for s in multi.setups}
    again = multi.cli("init", "--no-inbox")
    assert again.returncode == 0, again.stderr
    assert "nothing to do: everything already existed" in again.stdout

    status = multi.cli("status", "--json", "--no-require-active")
    assert status.returncode == 0, (status.stdout, status.stderr)
    fields = orjson.loads(status.stdout)
    assert [t["table"] for t in fields["tables"]] == [s.table for s in multi.setups]
    assert all(t["in_publication"] and t["dead_letters_pending"] == 0 for t in fields["tables"])
    assert fields["dead_letters_pending"] == 0 and fields["healthy"] is True
    text = multi.cli("status", "--no-require-active")
    assert "outbox tables:        3" in text.stdout, text.stdout
    for setup in multi.setups:
        assert f"  {setup.table}: published, 0 dead letter(s) pending" in text.stdout

    # A file naming only two of the publication's tables: the third would be dead letters.
    two = tmp_path / "two.toml"
    content = multi.path.read_text()
    two.write_text(content[: content.rindex("[[outbox]]")])
    refused = run_cli("run", "--config", str(two))
    assert refused.returncode == EX_CONFIG, refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and f"also covers {multi.setups[2].table}" in lines[0], lines
    unhealthy = run_cli("status", "--config", str(two), "--no-require-active")
    assert unhealthy.returncode == 1 and "also covers" in unhealthy.stdout

    dropped = multi.cli("drop", "--drop-publication", "--yes")
    assert dropped.returncode == 0, dropped.stderr
    assert f"replication slot {multi.slot}: dropped" in dropped.stdout
    assert published_tables(multi.setups[0].dsn, publication) == set()


async def test_three_outboxes_on_one_slot_each_in_order_to_its_exchange(
    multi: Multi, consumers: list[Consumer], file_relays: Any
) -> None:
    init = multi.cli("init", "--no-inbox")
    assert init.returncode == 0, init.stderr
    port = free_port()
    relay = file_relays(multi.path, metrics_port=port)
    await relay.wait_ready()
    ids: list[list[str]] = [[], [], []]
    with psycopg.connect(multi.setups[0].dsn) as conn:
        for n in range(30):  # transactions spanning the three tables, interleaved
            for index in random.Random(n).sample(range(3), 3):
                rows = [{"aggregate_id": "agg", "payload": {"n": n, "t": index}}]
                ids[index] += multi.setups[index].insert(conn, rows)
            conn.commit()
    for consumer, expected in zip(consumers, ids, strict=True):
        await consumer.wait_for(set(expected), timeout=60)
        await consumer.settle(quiet=0.5)
        # Its own table's rows only, in commit order.
        assert consumer.ids() == expected
    text = await metrics_text(port)
    for setup, expected in zip(multi.setups, ids, strict=True):
        labels = {"slot": multi.slot, "table": setup.table}
        assert metric(text, "cdc_relay_messages_confirmed_total", **labels) == len(expected)
        assert metric(text, "cdc_relay_messages_published_total", **labels) == len(expected)
    assert await wait_until(lambda: multi.setups[0].confirmed_lag() < 64 * 1024, 15)
    assert relay.terminate() == 0


async def test_an_outbox_whose_exchange_is_missing_dead_letters_and_the_others_flow(
    pg_dsn: str, amqp_url: str, tmp_path: Path, file_relays: Any
) -> None:
    multi = Multi(pg_dsn, amqp_url, tmp_path / "relay.toml", declare=False)
    # The missing exchange is the first [[outbox]]'s: with one outbox that would be an
    # outage; with several it must not block the others.
    third, first, second = multi.setups
    consumers = [await Consumer(s.amqp_url, s.names["exchange"]).start() for s in (first, second)]
    try:
        init = multi.cli("init", "--no-inbox", "--no-exchange")
        assert init.returncode == 0, init.stderr
        port = free_port()
        relay = file_relays(multi.path, "--slot-poll-interval", "1", metrics_port=port)
        await relay.wait_ready()
        by_table: dict[str, list[str]] = {s.table: [] for s in multi.setups}
        with psycopg.connect(pg_dsn) as conn:
            for n in range(10):
                for setup in multi.setups:
                    by_table[setup.table] += setup.insert(conn, [{"payload": {"n": n}}])
                conn.commit()
        ids = [by_table[first.table], by_table[second.table], by_table[third.table]]
        for consumer, expected in zip(consumers, ids[:2], strict=True):
            await consumer.wait_for(set(expected), timeout=60)
            # In commit order, none missing (the first 404 ended a session: repeats are fine).
            assert list(dict.fromkeys(consumer.ids())) == expected

        def dead_letters() -> list[tuple[str, str]]:
            with psycopg.connect(pg_dsn) as conn:
                rows = conn.execute(
                    f"SELECT outbox_id, reason FROM {third.table}_dead_letter ORDER BY id"
                ).fetchall()
            return [(r[0], r[1]) for r in rows]

        assert await wait_until(lambda: len({i for i, _ in dead_letters()}) >= 10, 60)
        letters = dead_letters()
        assert {i for i, _ in letters} == set(ids[2])
        assert all(third.names["exchange"] in reason for _, reason in letters), letters
        for setup in (first, second):  # nothing of theirs in their own dead-letter tables
            with psycopg.connect(pg_dsn) as conn:
                row = conn.execute(f"SELECT count(*) FROM {setup.table}_dead_letter").fetchone()
            assert row == (0,)
        assert await wait_until(lambda: first.confirmed_lag() < 64 * 1024, 15)
        text = await metrics_text(port)
        dead = metric(
            text,
            "cdc_relay_messages_dead_lettered_total",
            reason="exchange_refused",
            slot=multi.slot,
            table=third.table,
        )
        assert dead is not None and dead >= 1
        labels = {"slot": multi.slot, "table": first.table}
        confirmed = metric(text, "cdc_relay_messages_confirmed_total", **labels)
        assert confirmed is not None and confirmed >= 10  # with the repeats after the 404

        async def pending_gauge() -> float | None:  # summed over the slot's outboxes
            return metric(
                await metrics_text(port), "cdc_relay_dead_letters_pending", slot=multi.slot
            )

        deadline = asyncio.get_running_loop().time() + 15
        while await pending_gauge() != len(letters):
            assert asyncio.get_running_loop().time() < deadline, await pending_gauge()
            await asyncio.sleep(0.5)

        status = multi.cli("status", "--json")
        fields = orjson.loads(status.stdout)
        pending = {t["table"]: t["dead_letters_pending"] for t in fields["tables"]}
        assert pending == {first.table: 0, second.table: 0, third.table: len(letters)}
        assert fields["dead_letters_pending"] == len(letters)
        listed = multi.cli("dead-letters", "list", "--table", third.table)
        assert listed.returncode == 0, listed.stderr
        assert all(i in listed.stdout for i in ids[2])
        ambiguous = multi.cli("dead-letters", "list")
        assert ambiguous.returncode == EX_CONFIG and "name one with --table" in ambiguous.stderr
        assert relay.terminate() == 0
        # Once the exchange exists, the table's dead letters are replayed to it.
        late = await Consumer(third.amqp_url, third.names["exchange"]).start()
        consumers.append(late)
        replayed = multi.cli("dead-letters", "replay", "--table", third.table)
        assert replayed.returncode == 0, replayed.stderr
        await late.wait_for(set(ids[2]), timeout=30)
        assert orjson.loads(multi.cli("status", "--json").stdout)["dead_letters_pending"] == 0
    finally:
        for consumer in consumers:
            await consumer.close()
        multi.cleanup()


@pytest.mark.fault
async def test_kill_9_three_times_with_three_outboxes_loses_nothing(
    multi: Multi, consumers: list[Consumer], file_relays: Any
) -> None:
    init = multi.cli("init", "--no-inbox")
    assert init.returncode == 0, init.stderr
    workloads = [
        Workload(setup, total_rows=3000, writers=2, rows_per_second=600, max_seconds=60).start()
        for setup in multi.setups
    ]
    rng = random.Random(21)
    for _ in range(3):
        relay = file_relays(multi.path)
        await relay.wait_for_log_async("streaming from slot", timeout=60)
        await asyncio.sleep(rng.uniform(0.5, 2.0))
        relay.kill()
    file_relays(multi.path)
    for workload in workloads:
        await workload.wait(timeout=120)
    for setup, consumer in zip(multi.setups, consumers, strict=True):
        verdict = await verify(setup, consumer, timeout=120)  # per-aggregate order checked
        print(verdict.row(f"{setup.table}: relay kill -9 x3, three outboxes on one slot"))
        assert verdict.lost == 0
        assert verdict.committed >= 2500


async def test_a_second_outbox_leaving_the_publication_is_said_and_turns_readiness_red(
    multi: Multi, file_relays: Any
) -> None:
    init = multi.cli("init", "--no-inbox")
    assert init.returncode == 0, init.stderr
    port = free_port()
    relay = file_relays(multi.path, metrics_port=port)
    await relay.wait_ready()
    second = multi.setups[1]
    pub, table = second.settings.publication, second.table
    with psycopg.connect(second.dsn, autocommit=True) as conn:
        conn.execute(f"ALTER PUBLICATION {pub} DROP TABLE {table}")
        await relay.wait_for_log_async(f"does not cover the outbox {table}", 20)
        assert await wait_until(lambda: readyz(port) == 503, 5)

        def reported() -> str:
            return str(multi.cli("status").stdout)

        assert await wait_until(lambda: f"the outbox {table}" in reported(), 10)
        status = multi.cli("status")
        assert status.returncode == 1 and f"  {table}: NOT in the publication" in status.stdout
        conn.execute(f"ALTER PUBLICATION {pub} ADD TABLE {table}")
        await relay.wait_for_log_async("covers the outbox again", 20)
        assert await wait_until(lambda: readyz(port) == 200, 5)
        assert await wait_until(lambda: multi.cli("status").returncode == 0, 15)


async def test_init_emit_with_a_file_creates_the_emit_function_for_the_first_outbox_only(
    multi: Multi,
) -> None:
    """Emitted messages are the first outbox's: a later table's emit function would sign
    with a key the relay never checks, so each of its messages would be a dead letter."""
    done = multi.cli("init", "--no-inbox", "--emit")
    assert done.returncode == 0, done.stderr
    with psycopg.connect(multi.setups[0].dsn) as conn:
        rows = conn.execute(
            "SELECT proname FROM pg_proc WHERE proname = ANY(%s)",
            ([s.names["table"].split(".")[1] + "_emit" for s in multi.setups],),
        ).fetchall()
    assert {r[0] for r in rows} == {multi.setups[0].names["table"].split(".")[1] + "_emit"}

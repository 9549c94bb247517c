"""The exchange of another type: `init` and `run` say so in one line and exit 78."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import aio_pika
import pytest

from cdc_relay.config import EX_CONFIG
from tests.harness import Setup, run_cli, unique_names


@pytest.fixture
def outbox(pg_dsn: str, amqp_url: str) -> Iterator[Setup]:
    names = unique_names("amqpcli")
    setup = Setup(pg_dsn, amqp_url, names)
    setup.init()  # SQL objects only: the exchange is left to the test

    async def fanout() -> None:
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            channel = await connection.channel()
            await channel.declare_exchange(names["exchange"], "fanout", durable=True)

    asyncio.run(fanout())
    yield setup
    setup.cleanup()


@pytest.mark.parametrize("command", ["init", "run"])
def test_an_exchange_of_another_type_is_one_config_error(outbox: Setup, command: str) -> None:
    result = run_cli(command, *outbox.cli_args())
    assert result.returncode == EX_CONFIG, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert outbox.names["exchange"] in lines[0] and "different type" in lines[0]

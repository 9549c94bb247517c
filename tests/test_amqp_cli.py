"""The exchange of another type: `init` and `run` say so in one line and exit 78."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import aio_pika
import pytest

from cdc_relay.config import EX_CONFIG
from tests.harness import RelayProcess, Setup, run_cli, unique_names


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


@pytest.fixture
def silent_url() -> Iterator[str]:
    """A node that accepts TCP (the kernel does) and never answers the AMQP handshake."""
    listener = socket.create_server(("127.0.0.1", 0))
    yield f"amqp://guest:guest@127.0.0.1:{listener.getsockname()[1]}/"
    listener.close()


def test_init_gives_a_silent_broker_one_amqp_connect_timeout(
    pg_dsn: str, amqp_url: str, silent_url: str
) -> None:
    setup = Setup(pg_dsn, amqp_url, unique_names("silent"))
    setup.init()
    args = [silent_url if arg == amqp_url else arg for arg in setup.cli_args()]
    try:
        started = time.monotonic()
        result = run_cli("init", *args, "--amqp-connect-timeout", "1")
        elapsed = time.monotonic() - started
    finally:
        setup.cleanup()
    assert result.returncode == EX_CONFIG, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "no AMQP handshake within 1s" in lines[0], result.stderr
    assert elapsed < 8, f"init took {elapsed:.1f}s with a 1 s connect timeout"


def test_run_retries_a_silent_broker_every_amqp_connect_timeout(
    pg_dsn: str, amqp_url: str, silent_url: str, tmp_path: Path
) -> None:
    setup = Setup(pg_dsn, amqp_url, unique_names("silent"))
    setup.init()
    setup.settings.amqp_urls = [silent_url]
    relay = RelayProcess(setup, tmp_path / "relay.log", "--amqp-connect-timeout", "1").start()
    try:
        started = time.monotonic()
        assert wait_until_sync(lambda: relay.log().count("no AMQP handshake within 1s") >= 2, 15)
        assert time.monotonic() - started < 10, relay.log_tail()
        relay.check_alive()  # a broker that does not answer is waited for, not fatal
    finally:
        relay.stop_quietly()
        setup.cleanup()


def wait_until_sync(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()

"""A broker refusal that heals stops dead-lettering rows without a restart (issue 16).

Real RabbitMQ and Postgres, a real relay process: an exchange a row names is
deleted and re-created, the relay's own exchange is deleted (retried, never
dead-lettered), and a write permission is revoked for a few seconds.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from cdc_relay.limits import RECHECK_INTERVAL
from devtools.amqp import delete_topology, topology
from devtools.consumer import Consumer
from devtools.relayproc import RelayProcess
from tests.harness import Setup, run_cli, wait_until

pytestmark = pytest.mark.asyncio


def insert(setup: Setup, exchange: str | None = None) -> list[str]:
    with psycopg.connect(setup.dsn) as conn:
        ids = setup.insert(conn, [{"exchange": exchange, "routing_key": "heal.x"}])
        conn.commit()
    return ids


def dead_letters(setup: Setup) -> str:
    listed = run_cli("dead-letters", "list", *setup.cli_args("dead-letters list"))
    assert listed.returncode == 0, listed.stderr
    return listed.stdout


async def wait_dead_lettered(setup: Setup, outbox_id: str, timeout: float = 30) -> None:
    assert await wait_until(lambda: outbox_id in dead_letters(setup), timeout, interval=0.5), (
        f"row {outbox_id} was not dead-lettered"
    )


async def replay_all(setup: Setup) -> str:
    replay = await asyncio.to_thread(
        run_cli, "dead-letters", "replay", *setup.cli_args("dead-letters replay")
    )
    assert replay.returncode == 0, replay.stderr
    return replay.stderr


@pytest.fixture
def relay_user(rabbit_server: Any) -> Iterator[tuple[str, str]]:
    """A user with every permission on ``/`` (the test narrows it); (name, url)."""
    user = f"heal-{uuid.uuid4().hex[:6]}"
    rabbit_server.ctl("add_user", user, "pw")
    rabbit_server.ctl("set_permissions", "-p", "/", user, ".*", ".*", ".*")
    yield user, rabbit_server.amqp_url.replace("guest:guest@", f"{user}:pw@")
    rabbit_server.ctl("delete_user", user)


async def test_a_deleted_exchange_recreated_is_published_to_again_without_a_restart(
    outbox: Setup, relays: Callable[..., RelayProcess]
) -> None:
    url, side = outbox.amqp_url, f"{outbox.names['exchange']}_side"
    consumer = await Consumer(url, side).start()
    try:
        relay = relays(outbox)
        await relay.wait_for_log_async("streaming from slot")
        first = insert(outbox, side)
        await consumer.wait_for(set(first), 30)
        await delete_topology(url, None, side)
        [gone] = insert(outbox, side)
        await wait_dead_lettered(outbox, gone)
        await topology(url, side, consumer.queue_name)  # re-created and bound again
        await asyncio.sleep(RECHECK_INTERVAL)
        later = insert(outbox, side)
        await consumer.wait_for(set(later), 30)
        assert "no longer dead-lettering" in relay.log()
        assert later[0] not in dead_letters(outbox)
        assert "1 replayed, 0 failed" in await replay_all(outbox)
        await consumer.wait_for({gone}, 30)
        relay.check_alive()
    finally:
        await consumer.close()
        await delete_topology(url, consumer.queue_name, side)


async def test_the_relays_own_exchange_deleted_is_retried_never_dead_lettered(
    outbox: Setup, relays: Callable[..., RelayProcess]
) -> None:
    url, own = outbox.amqp_url, outbox.names["exchange"]
    consumer = await Consumer(url, own).start()
    try:
        relay = relays(outbox, "--no-declare")  # so only the test can re-create it
        await relay.wait_for_log_async("streaming from slot")
        await consumer.wait_for(set(insert(outbox)), 30)
        await delete_topology(url, None, own)
        second = insert(outbox)
        await relay.wait_for_log_async(f"no exchange '{own}'")
        await asyncio.sleep(2)  # sessions keep failing meanwhile
        await topology(url, own, consumer.queue_name)
        await consumer.wait_for(set(second), 30)
        assert second[0] not in dead_letters(outbox)
        assert "dead-lettered" not in relay.log()
        relay.check_alive()
    finally:
        await consumer.close()


async def test_write_permission_revoked_for_seconds_heals_without_a_restart(
    outbox: Setup,
    relays: Callable[..., RelayProcess],
    rabbit_server: Any,
    relay_user: tuple[str, str],
) -> None:
    user, user_url = relay_user
    own, side = outbox.names["exchange"], f"{outbox.names['exchange']}_side"
    consumer = await Consumer(outbox.amqp_url, side).start()
    own_consumer = await Consumer(outbox.amqp_url, own).start()
    try:
        relay = relays(Setup(outbox.dsn, user_url, outbox.names))
        await relay.wait_for_log_async("streaming from slot")
        await own_consumer.wait_for(set(insert(outbox)), 30)
        # A credential rotation: for 4 s this user may write only to the relay's own exchange.
        only_own = f"^{re.escape(own)}$"
        rabbit_server.ctl("set_permissions", "-p", "/", user, ".*", only_own, ".*")
        revoked = time.monotonic()
        [refused] = insert(outbox, side)
        await wait_dead_lettered(outbox, refused)
        await asyncio.sleep(max(0.0, 4 - (time.monotonic() - revoked)))
        rabbit_server.ctl("set_permissions", "-p", "/", user, ".*", ".*", ".*")
        await asyncio.sleep(RECHECK_INTERVAL)
        later = insert(outbox, side)
        await consumer.wait_for(set(later), 30)
        await own_consumer.wait_for(set(insert(outbox)), 30)
        assert "ACCESS_REFUSED" in relay.log() and "no longer dead-lettering" in relay.log()
        assert "1 replayed, 0 failed" in await replay_all(outbox)
        await consumer.wait_for({refused}, 30)
        relay.check_alive()
    finally:
        await consumer.close()
        await own_consumer.close()
        await delete_topology(outbox.amqp_url, consumer.queue_name, side)

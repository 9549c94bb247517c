"""Channel closes that name their culprit: a missing or forbidden exchange, a too-large body.

The reply texts are RabbitMQ's; the parser is tested on captured ones, and the
live tests check that a real broker's close reaches ``Outcome.lost`` with the
exchange or size limit and the publish that caused it.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from cdc_relay.amqp import Outcome, Publisher, PublishFailed, declare_exchange
from cdc_relay.amqp.replies import broker_max_message_size, close_error, refused_exchange
from cdc_relay.envelope import Envelope
from devtools.amqp import delete_topology, queue_depth, topology

# Captured from RabbitMQ 3.10 (the session broker) and 3.13/4.0 release texts.
NOT_FOUND = "NOT_FOUND - no exchange 'orders.v2' in vhost '/'"
ACCESS_REFUSED = (
    "ACCESS_REFUSED - write access to exchange 'audit' in vhost 'prod' refused for user 'relay'"
)
TOO_LARGE = "PRECONDITION_FAILED - message size 20480 is larger than configured max size 4096"


def test_reply_text_parsing() -> None:
    assert refused_exchange(404, NOT_FOUND) == "orders.v2"
    assert refused_exchange(403, ACCESS_REFUSED) == "audit"
    assert refused_exchange(404, "NOT_FOUND - no queue 'q' in vhost '/'") is None
    assert refused_exchange(406, NOT_FOUND) is None
    assert refused_exchange(404, "NOT_FOUND - no exchange 'it''s in vhost ' x' in vhost '/'") == (
        "it''s in vhost ' x"
    )
    assert broker_max_message_size(406, TOO_LARGE) == 4096
    assert broker_max_message_size(406, "PRECONDITION_FAILED - inequivalent arg 'type'") is None
    assert broker_max_message_size(404, TOO_LARGE) is None
    error = close_error("channel", 403, ACCESS_REFUSED)
    assert error.reply_code == 403 and error.refused_exchange == "audit"
    assert error.broker_max_message_size is None and "ACCESS_REFUSED" in error.reason


def envelope(exchange: str, n: int, body: bytes = b"{}") -> Envelope:
    return Envelope(exchange, "k", body, f"m-{n}-{uuid.uuid4()}", "T", {})


async def lost_after(
    publisher: Publisher, lost: list[PublishFailed], items: list[Envelope]
) -> PublishFailed:
    await publisher.connect()
    try:
        for seq, item in enumerate(items, start=1):
            await publisher.publish(seq, item)
        async with asyncio.timeout(10):
            while not lost:
                await asyncio.sleep(0.01)
        return lost[0]
    finally:
        await publisher.close()


def recording(lost: list[PublishFailed]) -> Callable[[Outcome], None]:
    def on_outcome(outcome: Outcome) -> None:
        if outcome.lost is not None:
            lost.append(outcome.lost)

    return on_outcome


@pytest.fixture
def limited_user(rabbit_server: Any) -> Iterator[tuple[str, str]]:
    """A user that may write only to exchanges named ``allowed-*``; (url, allowed exchange)."""
    user = f"limited-{uuid.uuid4().hex[:6]}"
    rabbit_server.ctl("add_user", user, "pw")
    rabbit_server.ctl("set_permissions", "-p", "/", user, "", "^allowed-.*", "")
    url = rabbit_server.amqp_url.replace("guest:guest@", f"{user}:pw@")
    yield url, f"allowed-{uuid.uuid4().hex[:6]}"
    rabbit_server.ctl("delete_user", user)


@pytest.mark.asyncio
async def test_forbidden_exchange_is_named_with_its_publish(
    rabbit_server: Any, limited_user: tuple[str, str]
) -> None:
    url, allowed = limited_user
    forbidden = f"forbidden-{uuid.uuid4().hex[:6]}"
    await declare_exchange([rabbit_server.amqp_url], allowed)
    await declare_exchange([rabbit_server.amqp_url], forbidden)
    lost: list[PublishFailed] = []
    publisher = Publisher([url], max_in_flight=10, on_outcome=recording(lost))
    error = await lost_after(
        publisher, lost, [envelope(allowed, 1), envelope(forbidden, 2), envelope(allowed, 3)]
    )
    assert error.reply_code == 403 and error.refused_exchange == forbidden
    assert error.culprit_seq == 2


@pytest.fixture
def small_max_message_size(rabbit_server: Any) -> Iterator[int]:
    """The broker's max_message_size lowered for channels opened meanwhile (restored after)."""
    before = rabbit_server.ctl("eval", "application:get_env(rabbit, max_message_size).").strip()
    rabbit_server.ctl("eval", "application:set_env(rabbit, max_message_size, 4096).")
    yield 4096
    if before.startswith("{ok,"):
        value = before.removeprefix("{ok,").removesuffix("}")
        rabbit_server.ctl("eval", f"application:set_env(rabbit, max_message_size, {value}).")
    else:
        rabbit_server.ctl("eval", "application:unset_env(rabbit, max_message_size).")


@pytest.mark.asyncio
async def test_body_over_the_broker_limit_reports_the_limit_and_its_publish(
    rabbit_server: Any, small_max_message_size: int
) -> None:
    exchange = f"size-{uuid.uuid4().hex[:6]}"
    await declare_exchange([rabbit_server.amqp_url], exchange)
    lost: list[PublishFailed] = []
    publisher = Publisher([rabbit_server.amqp_url], max_in_flight=10, on_outcome=recording(lost))
    error = await lost_after(
        publisher,
        lost,
        [envelope(exchange, 1), envelope(exchange, 2, b"x" * 20_000), envelope(exchange, 3)],
    )
    assert error.reply_code == 406
    assert error.broker_max_message_size == small_max_message_size
    assert error.culprit_seq == 2


# -- trial publishes: the re-check of a remembered refusal ------------------------------


@pytest.mark.asyncio
async def test_a_trial_publish_answers_like_a_real_one_and_delivers_nothing(
    rabbit_server: Any, small_max_message_size: int
) -> None:
    """Missing exchange, then present; over the size limit; the confirm channel unharmed."""
    exchange = f"trial-{uuid.uuid4().hex[:6]}"
    queue = f"q_{exchange}"
    outcomes: list[Outcome] = []
    publisher = Publisher([rabbit_server.amqp_url], max_in_flight=10, on_outcome=outcomes.append)
    await publisher.connect()
    try:
        missing = await publisher.try_publish(envelope(exchange, 1))
        assert missing is not None and missing.refused_exchange == exchange
        await topology(rabbit_server.amqp_url, exchange, queue)
        assert await publisher.try_publish(envelope(exchange, 2)) is None
        too_big = await publisher.try_publish(envelope(exchange, 3, b"x" * 20_000))
        assert too_big is not None
        assert too_big.broker_max_message_size == small_max_message_size
        assert await queue_depth(rabbit_server.amqp_url, queue) == 0  # rolled back, not routed
        await publisher.publish(4, envelope(exchange, 4))  # the confirm channel lives on
        assert await publisher.wait_confirmed(10)
        assert [o.confirmed for o in outcomes] == [[4]]
        assert await queue_depth(rabbit_server.amqp_url, queue) == 1
    finally:
        await publisher.close()
        await delete_topology(rabbit_server.amqp_url, queue, exchange)


@pytest.mark.asyncio
async def test_a_trial_publish_sees_a_write_permission_a_passive_declare_cannot(
    rabbit_server: Any, limited_user: tuple[str, str]
) -> None:
    url, allowed = limited_user
    forbidden = f"forbidden-{uuid.uuid4().hex[:6]}"
    await declare_exchange([rabbit_server.amqp_url], allowed)
    await declare_exchange([rabbit_server.amqp_url], forbidden)
    publisher = Publisher([url], max_in_flight=10, on_outcome=lambda _: None)
    await publisher.connect()
    try:
        assert await publisher.declare_exchange(forbidden, passive=True)  # no permission needed
        refused = await publisher.try_publish(envelope(forbidden, 1))
        assert refused is not None and refused.reply_code == 403
        assert refused.refused_exchange == forbidden
        assert await publisher.try_publish(envelope(allowed, 2)) is None
    finally:
        await publisher.close()

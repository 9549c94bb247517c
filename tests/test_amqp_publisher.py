"""The publisher against a real broker: connect, publish, confirm, returns, topology, bad nodes."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator

import aio_pika
import pytest
import pytest_asyncio
from pamqp import commands as spec
from pamqp.heartbeat import Heartbeat

from cdc_relay.amqp import (
    ConnectError,
    ExchangeError,
    Outcome,
    Publisher,
    PublishFailed,
    declare_exchange,
)
from cdc_relay.envelope import Envelope
from tests.amqp_fakes import FakeBroker, running

pytestmark = pytest.mark.asyncio


def envelope(exchange: str, n: int, routing_key: str = "t.x", body: bytes = b"{}") -> Envelope:
    return Envelope(exchange, routing_key, body, f"m-{n}-{uuid.uuid4()}", "T", {"n": n})


class Recorder:
    """Collects outcomes; ``settled`` counts confirmed plus failed publishes."""

    def __init__(self) -> None:
        self.confirmed: list[int] = []
        self.failed: list[tuple[int, PublishFailed]] = []
        self.lost: list[PublishFailed] = []
        self.changed = asyncio.Event()

    def __call__(self, outcome: Outcome) -> None:
        self.confirmed += outcome.confirmed
        self.failed += outcome.failed
        if outcome.lost is not None:
            self.lost.append(outcome.lost)
        self.changed.set()

    async def wait(self, predicate: object, timeout: float = 10) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():  # type: ignore[operator]
                self.changed.clear()
                await self.changed.wait()


@pytest_asyncio.fixture
async def exchange(amqp_url: str) -> AsyncIterator[str]:
    name = f"test-pub-{uuid.uuid4().hex[:8]}"
    assert await declare_exchange([amqp_url], name) == "created"
    yield name
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.exchange_delete(name)


async def bound_queue(
    amqp_url: str, exchange: str
) -> tuple[aio_pika.abc.AbstractConnection, aio_pika.abc.AbstractQueue]:
    connection = await aio_pika.connect(amqp_url)
    channel = await connection.channel()
    queue = await channel.declare_queue(exclusive=True)
    await queue.bind(exchange, "#")
    return connection, queue


async def test_declare_exchange_is_idempotent_and_refuses_another_type(
    amqp_url: str, exchange: str
) -> None:
    assert await declare_exchange([amqp_url], exchange) == "already exists"
    with pytest.raises(ExchangeError, match="different type"):
        await declare_exchange([amqp_url], exchange, "fanout")


async def test_declare_exchange_tries_every_url_and_redacts(amqp_url: str, exchange: str) -> None:
    dead = "amqp://guest:s3cret@127.0.0.1:1/"
    assert await declare_exchange([dead, amqp_url], exchange) == "already exists"
    with pytest.raises(ConnectError) as failure:
        await declare_exchange([dead], exchange)
    assert "s3cret" not in str(failure.value) and "127.0.0.1:1" in str(failure.value)


async def test_publish_confirm_in_order(amqp_url: str, exchange: str) -> None:
    consumer, queue = await bound_queue(amqp_url, exchange)
    recorder = Recorder()
    publisher = Publisher([amqp_url], max_in_flight=50, on_outcome=recorder)
    await publisher.connect()
    try:
        assert publisher.connected_url is not None and "guest:***@" in publisher.connected_url
        sent = [envelope(exchange, n) for n in range(500)]
        for seq, item in enumerate(sent):
            await publisher.publish(seq, item)
        assert await publisher.wait_confirmed(10)
        assert recorder.confirmed == list(range(500))
        assert recorder.failed == [] and recorder.lost == []
        assert not publisher.blocked and publisher.in_flight == 0
        received = []
        async with queue.iterator() as messages:
            async for message in messages:
                await message.ack()
                received.append(message.message_id)
                if len(received) == len(sent):
                    break
        assert received == [item.message_id for item in sent]
    finally:
        await publisher.close()
        await consumer.close()
    assert recorder.lost == []  # our own close is not a failure


async def test_unroutable_message_is_returned_not_confirmed(amqp_url: str, exchange: str) -> None:
    consumer, _ = await bound_queue(amqp_url, exchange)  # binds "#": routable
    unbound = f"test-unbound-{uuid.uuid4().hex[:8]}"
    recorder = Recorder()
    publisher = Publisher([amqp_url], max_in_flight=10, on_outcome=recorder)
    await publisher.connect()
    try:
        assert await publisher.declare_exchange(unbound)  # over the publisher's own connection
        await publisher.publish(1, envelope(exchange, 1))
        await publisher.publish(2, envelope(unbound, 2, body=b"x" * 300_000))  # multi-frame
        await publisher.publish(3, envelope(exchange, 3))
        assert await publisher.wait_confirmed(10)
        assert recorder.confirmed == [1, 3]
        [(seq, error)] = recorder.failed
        assert seq == 2 and error.returned and error.reply_code == 312
        assert recorder.lost == []
    finally:
        await publisher.declare_exchange(unbound)  # still usable: channel 2 is open
        await publisher.close()
        await consumer.close()


async def test_publisher_topology_channel_survives_a_missing_exchange(
    amqp_url: str, exchange: str
) -> None:
    recorder = Recorder()
    publisher = Publisher([amqp_url], max_in_flight=10, on_outcome=recorder)
    await publisher.connect()
    try:
        missing = f"test-missing-{uuid.uuid4().hex[:8]}"
        assert not await publisher.declare_exchange(missing, passive=True)
        assert await publisher.declare_exchange(exchange, passive=True)
        with pytest.raises(ExchangeError, match="different type"):
            await publisher.declare_exchange(exchange, "direct")
        assert await publisher.declare_exchange(exchange)
        await publisher.publish(1, envelope(exchange, 1))
        assert await publisher.wait_confirmed(10)
        assert recorder.lost == [] and (recorder.confirmed or recorder.failed)
    finally:
        await publisher.close()


async def test_publish_to_a_missing_exchange_names_it_and_its_publish(
    amqp_url: str, exchange: str
) -> None:
    consumer, _ = await bound_queue(amqp_url, exchange)
    missing = f"test-missing-{uuid.uuid4().hex[:8]}"
    recorder = Recorder()
    publisher = Publisher([amqp_url], max_in_flight=10, on_outcome=recorder)
    await publisher.connect()
    try:
        await publisher.publish(1, envelope(exchange, 1))
        await publisher.publish(2, envelope(missing, 2))
        await publisher.publish(3, envelope(exchange, 3))
        await recorder.wait(lambda: recorder.lost)
        [lost] = recorder.lost
        assert lost.reply_code == 404 and lost.refused_exchange == missing
        assert lost.culprit_seq == 2
        assert 2 not in recorder.confirmed and 3 not in recorder.confirmed
        with pytest.raises(PublishFailed):
            await publisher.publish(4, envelope(exchange, 4))
    finally:
        await publisher.close()
        await consumer.close()


async def test_connect_error_lists_every_node_redacted() -> None:
    publisher = Publisher(
        ["amqp://u:hunter2@127.0.0.1:1/", "amqp://v:hunter3@127.0.0.1:2/"],
        max_in_flight=1,
        on_outcome=lambda _: None,
    )
    with pytest.raises(ConnectError) as failure:
        await publisher.connect()
    text = str(failure.value)
    assert "hunter" not in text and "127.0.0.1:1" in text and "127.0.0.1:2" in text
    assert isinstance(failure.value, ConnectionError)


async def test_a_silent_node_first_does_not_stop_or_disturb_the_good_one(
    amqp_url: str, exchange: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node that accepts TCP and never answers: the handshake timeout moves on.

    When the silent node finally closes the socket, the live connection must
    not notice (each attempt is its own object).
    """
    accepted: list[asyncio.StreamWriter] = []

    async def silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    monkeypatch.setattr(random, "shuffle", lambda _items: None)  # keep the silent node first
    recorder = Recorder()
    publisher = Publisher(
        [f"amqp://guest:guest@127.0.0.1:{port}/", amqp_url],
        max_in_flight=10,
        connect_timeout=1.0,
        on_outcome=recorder,
    )
    started = time.monotonic()
    try:
        await publisher.connect()
        assert time.monotonic() - started < 5
        assert accepted, "the silent node was tried first"
        assert publisher.connected_url is not None and str(port) not in publisher.connected_url
        for writer in accepted:  # the silent node gives up on us now
            writer.close()
        server.close()
        await asyncio.sleep(0.2)
        await publisher.publish(1, envelope(exchange, 1))
        assert await publisher.wait_confirmed(10)
        assert recorder.lost == [] and len(recorder.confirmed) + len(recorder.failed) == 1
    finally:
        await publisher.close()
        server.close()


async def test_only_silent_nodes_fail_within_the_timeout() -> None:
    server = await asyncio.start_server(lambda _r, _w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    publisher = Publisher(
        [f"amqp://guest:pw@127.0.0.1:{port}/"],
        max_in_flight=1,
        connect_timeout=0.5,
        on_outcome=lambda _: None,
    )
    started = time.monotonic()
    try:
        with pytest.raises(ConnectError, match="handshake"):
            await publisher.connect()
        assert time.monotonic() - started < 3
    finally:
        server.close()


async def test_wrong_password_is_a_connect_error(amqp_url: str) -> None:
    bad = amqp_url.replace("guest:guest@", "guest:wrong-pw@")
    publisher = Publisher([bad], max_in_flight=1, on_outcome=lambda _: None)
    with pytest.raises(ConnectError) as failure:
        await publisher.connect()
    assert "wrong-pw" not in str(failure.value) and "403" in str(failure.value)


# -- timers and connection-level control, against a fake broker ---------------------------------


async def test_a_broker_that_goes_silent_is_lost_after_two_heartbeats() -> None:
    broker = FakeBroker(heartbeat=1)  # agrees to 1 s heartbeats, then never sends one
    recorder = Recorder()
    async with running(broker) as port:
        publisher = Publisher(
            [f"amqp://guest:guest@127.0.0.1:{port}/"],
            max_in_flight=10,
            heartbeat=5,
            on_outcome=recorder,
        )
        await publisher.connect()
        started = time.monotonic()
        try:
            await recorder.wait(lambda: recorder.lost, timeout=6)
        finally:
            await publisher.close()
    assert 1.5 < time.monotonic() - started < 4
    assert "no data from RabbitMQ" in recorder.lost[0].reason
    assert any(isinstance(frame, Heartbeat) for frame in broker.frames)  # ours went out


async def test_no_confirm_within_the_timeout_ends_the_session_and_says_blocked() -> None:
    broker = FakeBroker()
    recorder = Recorder()
    async with running(broker) as port:
        publisher = Publisher(
            [f"amqp://guest:guest@127.0.0.1:{port}/"],
            max_in_flight=10,
            confirm_timeout=1.0,
            on_outcome=recorder,
        )
        await publisher.connect()
        try:
            broker.send(spec.Connection.Blocked(reason="low on memory"))
            await asyncio.sleep(0.1)
            assert publisher.blocked
            broker.send(spec.Connection.Unblocked())
            await asyncio.sleep(0.1)
            assert not publisher.blocked
            broker.send(spec.Connection.Blocked(reason="low on disk"))
            await publisher.publish(1, envelope("ex", 1))
            started = time.monotonic()
            await recorder.wait(lambda: recorder.lost, timeout=5)
            assert 0.9 < time.monotonic() - started < 3
        finally:
            await publisher.close()
    [lost] = recorder.lost
    assert "no confirm within 1s" in lost.reason and "blocked" in lost.reason
    assert recorder.confirmed == [] and recorder.failed == []
    assert any(isinstance(frame, spec.Basic.Publish) for frame in broker.frames)


async def test_connecting_again_drops_the_previous_connection() -> None:
    broker = FakeBroker()
    async with running(broker) as port:
        publisher = Publisher(
            [f"amqp://guest:guest@127.0.0.1:{port}/"], max_in_flight=10, on_outcome=Recorder()
        )
        await publisher.connect()
        await publisher.connect()
        try:
            assert len(broker.writers) == 2
            async with asyncio.timeout(5):
                while not broker.writers[0].is_closing():  # the broker saw the first one go
                    await asyncio.sleep(0.02)
            assert not broker.writers[1].is_closing()
        finally:
            await publisher.close()

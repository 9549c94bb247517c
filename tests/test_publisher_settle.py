"""How the publisher turns ack, nack and return frames into outcomes (no socket needed).

The publisher runs over a real ``Connection`` whose transport is a recording
fake: frames are fed in as the bytes a broker would send, so the connection's
decoding and dispatch table are exercised too.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from pamqp import commands as spec
from pamqp import frame as pamqp_frame
from pamqp.base import Frame
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

from cdc_relay.amqp import Outcome, Publisher, PublishFailed, UnpublishableMessage
from cdc_relay.amqp.connection import Connection
from cdc_relay.envelope import Envelope

pytestmark = pytest.mark.asyncio


def envelope(n: int, **changes: Any) -> Envelope:
    fields: dict[str, Any] = {
        "exchange": "ex",
        "routing_key": "rk",
        "body": b"{}",
        "message_id": f"id-{n}",
        "type": "T",
        "headers": {},
    }
    fields.update(changes)
    return Envelope(**fields)


class FakeTransport:
    """Records writes; honours nothing else (the publisher never reads from it)."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.aborted

    def abort(self) -> None:
        self.aborted = True


class Outcomes:
    def __init__(self) -> None:
        self.confirmed: list[list[int]] = []
        self.failed: list[tuple[int, str, bool]] = []
        self.lost: list[PublishFailed] = []

    def on_outcome(self, outcome: Outcome) -> None:
        if outcome.confirmed:
            self.confirmed.append(list(outcome.confirmed))
        for seq, error in outcome.failed:
            self.failed.append((seq, error.reason, error.returned))
        if outcome.lost is not None:
            self.lost.append(outcome.lost)


def connected(
    window: int = 100, window_bytes: int = 64 * 1024 * 1024
) -> tuple[Publisher, Connection, FakeTransport, Outcomes]:
    outcomes = Outcomes()
    publisher = Publisher(
        ["amqp://127.0.0.1:1/"],
        max_in_flight=window,
        max_in_flight_bytes=window_bytes,
        on_outcome=outcomes.on_outcome,
    )
    connection = Connection(publisher.frame_received, None, heartbeat=0)
    transport = FakeTransport()
    connection.connection_made(transport)  # type: ignore[arg-type]
    connection.opened = True
    publisher._adopt(connection)
    return publisher, connection, transport, outcomes


async def publisher_with(count: int, window: int = 100) -> tuple[Publisher, Connection, Outcomes]:
    publisher, connection, _, outcomes = connected(window)
    for n in range(1, count + 1):
        await publisher.publish(100 + n, envelope(n))  # tags 1..count, seqs 101..
    return publisher, connection, outcomes


def feed(connection: Connection, *frames: Frame) -> None:
    connection.data_received(b"".join(pamqp_frame.marshal(f, 1) for f in frames))


def returned(connection: Connection, n: int, body: bytes = b"") -> None:
    frames: list[Frame] = [
        spec.Basic.Return(312, "NO_ROUTE", "ex", "rk"),
        ContentHeader(body_size=len(body), properties=spec.Basic.Properties(message_id=f"id-{n}")),
    ]
    frames += [ContentBody(body[i : i + 3]) for i in range(0, len(body), 3)]
    feed(connection, *frames)


async def test_one_multiple_ack_reports_one_batch_in_order() -> None:
    publisher, connection, outcomes = await publisher_with(5)
    feed(connection, spec.Basic.Ack(delivery_tag=3, multiple=True))
    feed(connection, spec.Basic.Ack(delivery_tag=5, multiple=False))
    feed(connection, spec.Basic.Ack(delivery_tag=4, multiple=False))
    assert outcomes.confirmed == [[101, 102, 103], [105], [104]]
    assert outcomes.failed == []
    assert publisher.in_flight == 0


async def test_a_returned_message_inside_a_multiple_ack_is_a_failure_not_a_confirm() -> None:
    _, connection, outcomes = await publisher_with(5)
    returned(connection, 3)
    feed(connection, spec.Basic.Ack(delivery_tag=5, multiple=True))
    assert outcomes.confirmed == [[101, 102, 104, 105]]
    assert [(seq, was_returned) for seq, _, was_returned in outcomes.failed] == [(103, True)]
    assert "NO_ROUTE" in outcomes.failed[0][1]


async def test_a_return_with_a_body_in_several_frames_is_matched_after_the_last() -> None:
    _, connection, outcomes = await publisher_with(2)
    returned(connection, 2, body=b"0123456789")
    feed(connection, spec.Basic.Ack(delivery_tag=2, multiple=True))
    assert outcomes.confirmed == [[101]]
    assert [seq for seq, _, _ in outcomes.failed] == [102]
    assert outcomes.lost == []


async def test_each_return_is_reported_with_its_own_reply() -> None:
    _, connection, outcomes = await publisher_with(3)
    returned(connection, 1)
    returned(connection, 2)
    feed(
        connection,
        spec.Basic.Return(312, "NO_ROUTE", "ex", "other.key"),
        ContentHeader(body_size=0, properties=spec.Basic.Properties(message_id="id-3")),
    )
    feed(connection, spec.Basic.Ack(delivery_tag=3, multiple=True))
    assert [(seq, "'rk'" in reason) for seq, reason, _ in outcomes.failed] == [
        (101, True),
        (102, True),
        (103, False),
    ]
    assert "routing key 'other.key'" in outcomes.failed[2][1]


async def test_an_unmatched_return_ends_the_session() -> None:
    publisher, connection, outcomes = await publisher_with(2)
    returned(connection, 7)
    assert len(outcomes.lost) == 1 and "matches no unsettled publish" in outcomes.lost[0].reason
    feed(connection, spec.Basic.Ack(delivery_tag=2, multiple=True))
    assert outcomes.confirmed == []  # nothing counts as confirmed after the loss
    with pytest.raises(PublishFailed):
        await publisher.publish(200, envelope(200))


async def test_nack_multiple_fails_each_and_confirms_none() -> None:
    _, connection, outcomes = await publisher_with(3)
    feed(connection, spec.Basic.Nack(delivery_tag=2, multiple=True))
    feed(connection, spec.Basic.Ack(delivery_tag=3, multiple=False))
    assert [seq for seq, _, _ in outcomes.failed] == [101, 102]
    assert outcomes.confirmed == [[103]]


async def test_duplicate_and_unknown_acks_are_ignored() -> None:
    publisher, connection, outcomes = await publisher_with(2)
    feed(connection, spec.Basic.Ack(delivery_tag=1, multiple=False))
    feed(connection, spec.Basic.Ack(delivery_tag=1, multiple=False))
    feed(connection, spec.Basic.Ack(delivery_tag=9, multiple=False))
    assert outcomes.confirmed == [[101]]
    assert publisher.in_flight == 1


async def test_full_window_waits_until_an_ack_opens_it() -> None:
    publisher, connection, outcomes = await publisher_with(2, window=2)
    blocked = asyncio.create_task(publisher.publish(103, envelope(3)))
    await asyncio.sleep(0.01)
    assert not blocked.done()
    feed(connection, spec.Basic.Ack(delivery_tag=1, multiple=False))
    await asyncio.wait_for(blocked, 1)
    assert publisher.in_flight == 2
    assert outcomes.confirmed == [[101]]


async def test_byte_budget_waits_until_an_ack_frees_bytes() -> None:
    publisher, connection, _, outcomes = connected(window=100, window_bytes=1000)
    await publisher.publish(1, envelope(1, body=b"x" * 900))
    await publisher.publish(2, envelope(2, body=b"x" * 900))  # over budget only after it
    blocked = asyncio.create_task(publisher.publish(3, envelope(3)))
    await asyncio.sleep(0.01)
    assert not blocked.done()
    feed(connection, spec.Basic.Ack(delivery_tag=2, multiple=True))
    await asyncio.wait_for(blocked, 1)
    assert outcomes.confirmed == [[1, 2]]


async def test_a_message_id_already_in_flight_waits_for_its_settlement() -> None:
    publisher, connection, transport, outcomes = connected()
    await publisher.publish(1, envelope(1))
    second = asyncio.create_task(publisher.publish(2, envelope(1)))  # same id
    await asyncio.sleep(0.01)
    assert not second.done() and publisher.in_flight == 1
    assert transport.written  # the first one was flushed while the second waits
    feed(connection, spec.Basic.Ack(delivery_tag=1, multiple=False))
    await asyncio.wait_for(second, 1)
    returned(connection, 1)  # now unambiguous: the second publish
    feed(connection, spec.Basic.Ack(delivery_tag=2, multiple=False))
    assert outcomes.confirmed == [[1]]
    assert [seq for seq, _, _ in outcomes.failed] == [2]


async def test_paused_transport_holds_publishes_until_resumed() -> None:
    publisher, connection, _, _ = connected()
    connection.pause_writing()
    blocked = asyncio.create_task(publisher.publish(1, envelope(1)))
    await asyncio.sleep(0.01)
    assert not blocked.done() and publisher.in_flight == 0
    connection.resume_writing()
    await asyncio.wait_for(blocked, 1)
    assert publisher.in_flight == 1


async def test_unencodable_envelopes_raise_before_anything_is_queued() -> None:
    publisher, _, transport, _ = connected()
    deep: dict[str, Any] = {}
    node = deep
    for _ in range(5000):
        node["x"] = {}
        node = node["x"]
    bad = [
        envelope(1, headers={"big": "x" * 200_000}),  # header block larger than frame_max
        envelope(2, headers=deep),  # RecursionError in the table encoder
        envelope(3, headers={"obj": object()}),  # a type AMQP cannot carry
        envelope(4, exchange="e" * 300),  # longer than a short string
        envelope(6, headers={"t": {"k" * 129: 1}}),  # nested key over 128 bytes
        envelope(7, headers={"n": 2**64}),  # no AMQP integer type fits
    ]
    for item in bad:
        with pytest.raises(UnpublishableMessage):
            await publisher.publish(1, item)
    assert publisher.in_flight == 0
    await asyncio.sleep(0)
    assert not transport.written
    await publisher.publish(5, envelope(5))  # the publisher is still usable
    assert publisher.in_flight == 1


async def test_publish_nowait_queues_only_what_needs_no_waiting() -> None:
    """The pump's fast path: False (nothing queued) wherever ``publish`` would wait."""
    publisher, connection, transport, outcomes = connected(window=2)
    assert publisher.publish_nowait(1, envelope(1))
    assert not publisher.publish_nowait(2, envelope(1))  # the same id is in flight
    assert publisher.publish_nowait(2, envelope(2))
    assert not publisher.publish_nowait(3, envelope(3))  # the window is full
    assert publisher.in_flight == 2
    feed(connection, spec.Basic.Ack(delivery_tag=2, multiple=True))
    connection.pause_writing()
    assert not publisher.publish_nowait(3, envelope(3))  # the transport is paused
    connection.resume_writing()
    with pytest.raises(UnpublishableMessage):
        publisher.publish_nowait(3, envelope(3, exchange="e" * 300))
    assert publisher.in_flight == 0
    assert publisher.publish_nowait(3, envelope(3))
    await asyncio.sleep(0)  # one write for what was queued
    slow, _, slow_transport, _ = connected(window=2)
    for n in (1, 2, 3):
        await slow.publish(n, envelope(n))
        if n == 2:
            feed(slow._conn, spec.Basic.Ack(delivery_tag=2, multiple=True))  # type: ignore[arg-type]
    await asyncio.sleep(0)
    assert transport.written == slow_transport.written  # the same frames as publish writes
    assert outcomes.confirmed == [[1, 2]]
    feed(connection, spec.Channel.Close(404, "NOT_FOUND - no exchange 'ex' in vhost '/'", 60, 40))
    assert not publisher.publish_nowait(4, envelope(4))  # lost: publish raises
    with pytest.raises(PublishFailed):
        await publisher.publish(4, envelope(4))


async def test_channel_close_reports_everything_lost_once() -> None:
    publisher, connection, outcomes = await publisher_with(2)
    feed(connection, spec.Channel.Close(404, "NOT_FOUND - no exchange 'nope' in vhost '/'", 60, 40))
    assert len(outcomes.lost) == 1
    lost = outcomes.lost[0]
    assert lost.reply_code == 404 and lost.refused_exchange == "nope"
    assert outcomes.confirmed == [] and outcomes.failed == []
    assert not await publisher.wait_confirmed(0.1)


async def test_our_own_close_is_not_reported() -> None:
    publisher, _, outcomes = await publisher_with(2)
    await publisher.close()
    assert outcomes.lost == [] and outcomes.failed == [] and outcomes.confirmed == []

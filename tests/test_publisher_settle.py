"""How the publisher turns ack, nack and return frames into outcomes (no connection needed).

Frames are fed to ``Publisher.frame_received`` exactly as the protocol parser
hands them over; nothing is written anywhere because no connection is open.
"""

from __future__ import annotations

import asyncio

import pytest
from pamqp import commands as spec
from pamqp.header import ContentHeader

from cdc_relay.amqp import Publisher, PublishFailed
from cdc_relay.router import Envelope

pytestmark = pytest.mark.asyncio


def envelope(n: int) -> Envelope:
    return Envelope("ex", "rk", b"{}", f"id-{n}", "T", {})


class Outcomes:
    def __init__(self) -> None:
        self.confirmed: list[list[int]] = []
        self.failed: list[tuple[int, str, bool]] = []

    def on_confirm(self, seqs: list[int]) -> None:
        self.confirmed.append(list(seqs))

    def on_failure(self, seq: int, _envelope: Envelope, error: PublishFailed) -> None:
        self.failed.append((seq, error.reason, error.returned))


async def publisher_with(count: int, window: int = 100) -> tuple[Publisher, Outcomes]:
    outcomes = Outcomes()
    publisher = Publisher(
        ["amqp://127.0.0.1:1/"],
        max_in_flight=window,
        on_confirm=outcomes.on_confirm,
        on_failure=outcomes.on_failure,
    )
    for n in range(1, count + 1):
        await publisher.publish(100 + n, envelope(n))  # tags 1..count, seqs 101..
    return publisher, outcomes


def returned(publisher: Publisher, n: int) -> None:
    publisher.frame_received(1, spec.Basic.Return(312, "NO_ROUTE", "ex", "rk"))
    publisher.frame_received(
        1, ContentHeader(body_size=0, properties=spec.Basic.Properties(message_id=f"id-{n}"))
    )


async def test_one_multiple_ack_reports_one_batch_in_order() -> None:
    publisher, outcomes = await publisher_with(5)
    publisher.frame_received(1, spec.Basic.Ack(delivery_tag=3, multiple=True))
    publisher.frame_received(1, spec.Basic.Ack(delivery_tag=5, multiple=False))
    publisher.frame_received(1, spec.Basic.Ack(delivery_tag=4, multiple=False))
    assert outcomes.confirmed == [[101, 102, 103], [105], [104]]
    assert outcomes.failed == []
    assert publisher.in_flight == 0


async def test_a_returned_message_inside_a_multiple_ack_is_a_failure_not_a_confirm() -> None:
    publisher, outcomes = await publisher_with(5)
    returned(publisher, 3)
    publisher.frame_received(1, spec.Basic.Ack(delivery_tag=5, multiple=True))
    assert outcomes.confirmed == [[101, 102, 104, 105]]
    assert [(seq, was_returned) for seq, _, was_returned in outcomes.failed] == [(103, True)]
    assert "NO_ROUTE" in outcomes.failed[0][1]


async def test_nack_multiple_fails_each_and_confirms_none() -> None:
    publisher, outcomes = await publisher_with(3)
    publisher.frame_received(1, spec.Basic.Nack(delivery_tag=2, multiple=True))
    publisher.frame_received(1, spec.Basic.Ack(delivery_tag=3, multiple=False))
    assert [seq for seq, _, _ in outcomes.failed] == [101, 102]
    assert outcomes.confirmed == [[103]]


async def test_duplicate_and_unknown_acks_are_ignored() -> None:
    publisher, outcomes = await publisher_with(2)
    publisher.frame_received(1, spec.Basic.Ack(delivery_tag=1, multiple=False))
    publisher.frame_received(1, spec.Basic.Ack(delivery_tag=1, multiple=False))
    publisher.frame_received(1, spec.Basic.Ack(delivery_tag=9, multiple=False))
    assert outcomes.confirmed == [[101]]
    assert publisher.in_flight == 1


async def test_full_window_waits_until_an_ack_opens_it() -> None:
    publisher, outcomes = await publisher_with(2, window=2)
    blocked = asyncio.create_task(publisher.publish(103, envelope(3)))
    await asyncio.sleep(0.01)
    assert not blocked.done()
    publisher.frame_received(1, spec.Basic.Ack(delivery_tag=1, multiple=False))
    await asyncio.wait_for(blocked, 1)
    assert publisher.in_flight == 2
    assert outcomes.confirmed == [[101]]

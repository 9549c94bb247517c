"""The batch paths of the hot loop against the one-at-a-time paths, for random streams.

``SessionCore.receive_many`` (the pump's loop over one read, up to the next
action) must answer exactly what ``receive`` answers frame by frame, wherever
the reads are cut, with the same flush positions whatever the broker settles
in between; ``PublishEncoder.encode`` (one join for a one-frame body) must write
the bytes of the general encoding (``encode_method_publish`` +
``encode_content``, checked against pamqp in test_amqp_wire); and
``Publisher.publish_nowait`` must write what ``publish`` writes.
"""

from __future__ import annotations

import asyncio
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from pamqp import commands as spec

from cdc_relay.amqp import Outcome, PublishFailed
from cdc_relay.amqp.publisher import UnpublishableMessage
from cdc_relay.amqp_wire import (
    PublishEncoder,
    encode_content,
    encode_method_publish,
    encode_properties,
)
from cdc_relay.core import STOP, PendingDeadLetter, SessionCore
from cdc_relay.envelope import Envelope
from cdc_relay.limits import Recheck
from tests.test_core import COMMIT_UNIX, OTHER, begin, commit, insert, keepalive, make_core
from tests.test_core import relation as outbox_relation
from tests.test_publisher_settle import connected, envelope, feed

# A row: "ok", "unreadable" (a dead letter), "other" (another table), "big" (over the limit).
rows = st.sampled_from(["ok", "ok", "ok", "unreadable", "other", "big"])
transactions = st.lists(rows, max_size=4)
streams = st.lists(
    st.tuples(transactions, st.booleans()),  # (its rows, a keepalive after it)
    min_size=1,
    max_size=12,
)


def frames_of(stream: list[tuple[list[str], bool]]) -> list[bytes]:
    frames = [outbox_relation(), outbox_relation(OTHER, name="orders")]
    lsn, n = 0x10000, 0
    for rows_, keep in stream:
        frames.append(begin(lsn))
        for kind in rows_:
            n += 1
            if kind == "unreadable":
                frames.append(insert(n, payload=None))
            elif kind == "other":
                frames.append(insert(n, relid=OTHER))
            elif kind == "big":
                frames.append(insert(n, payload=b'{"x": "%s"}' % (b"y" * 300)))
            else:
                frames.append(insert(n))
        frames.append(commit(lsn, lsn + 0x30))
        if keep:
            frames.append(keepalive(lsn + 0x40))
        lsn += 0x100
    return frames


def summary(seq: int, action: Any) -> tuple[Any, ...]:
    """What the pump does with an action, as a comparable value (bytes for a publish)."""
    if type(action) is Envelope:
        return ("publish", seq, PublishEncoder(1, 4096).encode(action))
    if type(action) is PendingDeadLetter:
        letter = action.letter
        return ("dead", action.seq, letter.outbox_id, letter.reason, letter.row, letter.lsn)
    if isinstance(action, Recheck):
        return ("recheck", action.seq)
    assert action is STOP
    return ("stop",)


class Broker:
    """Settles the published sequence numbers at the points a test chose: acks and returns."""

    def __init__(self, core: SessionCore, plan: list[int]) -> None:
        self.core = core
        self.plan = plan  # per action: 0 nothing, 1 ack all so far, 2 return the newest
        self.published: list[int] = []
        self.dead: list[int] = []
        self.log: list[tuple[Any, ...]] = []

    def after(self, index: int, seq: int, action: Any) -> None:
        if type(action) is Envelope:
            self.published.append(seq)
        elif type(action) is PendingDeadLetter:
            self.dead.append(action.seq)
        what = self.plan[index % len(self.plan)] if self.plan else 0
        if what == 1 and self.published:
            self.settle(Outcome(list(self.published), [], None))
            self.published.clear()
        elif what == 2 and self.published:
            returned = self.published.pop()
            error = PublishFailed("returned", returned=True, reply_code=312)
            self.settle(Outcome([], [(returned, error)], None))
        if what and self.dead:  # the sink stored what was queued
            self.core.stored(list(self.dead), COMMIT_UNIX)
            self.dead.clear()
        self.log.append(("flush", self.core.flush_lsn, self.core.unconfirmed))

    def settle(self, outcome: Outcome) -> None:
        for letter in self.core.settle(outcome, COMMIT_UNIX):
            self.log.append(summary(letter.seq, letter))
            self.dead.append(letter.seq)

    def finish(self) -> None:
        self.settle(Outcome(list(self.published), [], None))
        self.core.stored(list(self.dead), COMMIT_UNIX)
        self.log.append(("end", self.core.flush_lsn, self.core.unconfirmed))


@settings(max_examples=400, deadline=None)
@given(
    streams,
    st.lists(st.integers(1, 9), max_size=20),  # where the reads are cut
    st.lists(st.sampled_from([0, 0, 1, 2]), max_size=20),
    st.one_of(st.none(), st.integers(0, 30)),  # a clean stop asked before this action
)
def test_receive_many_over_any_batches_answers_what_receive_answers_frame_by_frame(
    stream: list[tuple[list[str], bool]], cuts: list[int], plan: list[int], stop_at: int | None
) -> None:
    frames = frames_of(stream)
    one, _ = make_core(0x100, max_message_size=200)
    batch, _ = make_core(0x100, max_message_size=200)
    by_frame, by_batch = Broker(one, plan), Broker(batch, plan)

    # One at a time, as the pump did.
    actions = 0
    for frame in frames:
        if stop_at is not None and actions == stop_at:
            one.request_stop()
        action = one.receive(frame)
        if action is None:
            continue
        by_frame.log.append(summary(one.last_seq, action))
        by_frame.after(actions, one.last_seq, action)
        actions += 1
        if action is STOP:
            break
    by_frame.finish()

    # In batches cut anywhere, as the pump does now.
    batches, start = [], 0
    for size in [*cuts, len(frames)]:
        batches.append(frames[start : start + size])
        start += size
        if start >= len(frames):
            break
    actions, stopped = 0, False
    for part in batches:
        i = 0
        while i < len(part) and not stopped:
            if stop_at is not None and actions == stop_at:
                batch.request_stop()
            i, action = batch.receive_many(part, i)
            if action is None:
                assert i == len(part)
                break
            by_batch.log.append(summary(batch.last_seq, action))
            by_batch.after(actions, batch.last_seq, action)
            actions += 1
            stopped = action is STOP
        if stopped:
            break
    by_batch.finish()

    assert by_batch.log == by_frame.log
    assert (batch.received_lsn, batch.status_positions()) == (
        one.received_lsn,
        one.status_positions(),
    )


envelopes = st.builds(
    Envelope,
    exchange=st.sampled_from(["outbox", "ex", ""]),
    routing_key=st.text(max_size=20),
    body=st.binary(max_size=300),
    message_id=st.text(min_size=1, max_size=40),
    type=st.one_of(st.none(), st.text(max_size=10)),
    headers=st.dictionaries(
        st.text(min_size=1, max_size=10), st.one_of(st.text(max_size=20), st.integers(-9, 9))
    ),
    content_encoding=st.one_of(st.none(), st.just("gzip")),
    correlation_id=st.one_of(st.none(), st.text(max_size=10)),
    priority=st.one_of(st.none(), st.integers(0, 9)),
)


@settings(max_examples=500, deadline=None)
@given(envelopes, st.sampled_from([4096, 131072, 300, 200]))
def test_the_one_join_encoding_is_the_general_encoding(item: Envelope, frame_max: int) -> None:
    try:
        flags, properties = encode_properties(item)
        general: bytes | str = encode_method_publish(
            1, item.exchange, item.routing_key, True
        ) + encode_content(1, flags, properties, item.body, frame_max)
    except ValueError as exc:
        general = f"refused: {exc}"
    try:
        fast: bytes | str = PublishEncoder(1, frame_max).encode(item)
    except ValueError as exc:
        fast = f"refused: {exc}"
    assert fast == general


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, 6), st.booleans(), st.booleans()),  # (id, unencodable, ack now)
        min_size=1,
        max_size=25,
    ),
    st.integers(1, 4),
)
def test_publish_nowait_writes_what_publish_writes(
    plan: list[tuple[int, bool, bool]], window: int
) -> None:
    """The same publishes through ``publish`` alone and through the pump's fast path."""

    async def run(fast: bool) -> tuple[bytes, list[Any]]:
        publisher, connection, transport, outcomes = connected(window=window)
        tag = 0
        results: list[Any] = []

        def ack_all() -> None:
            if publisher.in_flight:
                feed(connection, spec.Basic.Ack(delivery_tag=tag, multiple=True))

        for seq, (n, unencodable, ack_now) in enumerate(plan, 1):
            item = envelope(n, exchange="e" * 300) if unencodable else envelope(n)
            must_wait = not publisher._window.can_add(item.message_id)  # the broker then acks
            try:
                if not (fast and publisher.publish_nowait(seq, item)):
                    assert must_wait or not fast or unencodable
                    if must_wait:
                        asyncio.get_running_loop().call_soon(ack_all)
                    await publisher.publish(seq, item)
                tag += 1
                results.append(seq)
            except UnpublishableMessage:
                results.append(("unpublishable", seq))
            if ack_now:
                ack_all()
            await asyncio.sleep(0)
        ack_all()
        await asyncio.sleep(0)
        return bytes(transport.written), [*results, outcomes.confirmed]

    assert asyncio.run(run(True)) == asyncio.run(run(False))

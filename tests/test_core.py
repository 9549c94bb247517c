"""The session core without a server: frames and broker outcomes in, actions out.

Frames are built with the independent pgoutput encoder (tests/pgoutput_encoder.py)
wrapped in walsender CopyData framing written here from the protocol docs.
"""

from __future__ import annotations

import hashlib
import hmac
import subprocess
import sys
from typing import Any

import orjson
import pytest

from cdc_relay import reasons
from cdc_relay.amqp import Outcome, PublishFailed
from cdc_relay.amqp.window import ConfirmWindow
from cdc_relay.core import (
    STOP,
    PendingDeadLetter,
    PublishRefused,
    SessionCore,
    SessionFailed,
)
from cdc_relay.deadletters import DeadLetterRecord
from cdc_relay.emitauth import EMIT_AUTH_FAILED, authenticated
from cdc_relay.envelope import Envelope
from cdc_relay.layout import build_layout
from cdc_relay.limits import RECHECK_INTERVAL, BrokerLimits, Recheck
from cdc_relay.metrics import Metrics
from cdc_relay.pg.pgoutput import Begin, Column, Commit, Insert, LogicalMessage, Relation
from cdc_relay.replay import row_from_record
from cdc_relay.router import Router
from tests.pgoutput_encoder import encode

OUTBOX = 16391
OTHER = 16401
COLUMNS = (
    "id",
    "aggregate_type",
    "aggregate_id",
    "event_type",
    "payload",
    "headers",
    "exchange",
    "routing_key",
    "created_at",
)
COMMIT_TS = 848717704572437  # µs since 2000-01-01
COMMIT_UNIX = COMMIT_TS / 1e6 + 946_684_800


def xlog(message: Any, lsn: int = 0x1000) -> bytes:
    payload = encode(message)
    return b"w" + lsn.to_bytes(8, "big") + lsn.to_bytes(8, "big") + (0).to_bytes(8, "big") + payload


def keepalive(wal_end: int, reply: bool = False) -> bytes:
    return b"k" + wal_end.to_bytes(8, "big") + (0).to_bytes(8, "big") + bytes([reply])


def relation(relid: int = OUTBOX, name: str = "outbox", namespace: str = "public") -> bytes:
    columns = tuple(Column(1 if c == "id" else 0, c, 25, -1) for c in COLUMNS)
    return xlog(Relation(relid, namespace, name, "d", columns))


def insert(n: int, relid: int = OUTBOX, **overrides: bytes | None) -> bytes:
    values: dict[str, bytes | None] = {
        "id": f"00000000-0000-0000-0000-{n:012d}".encode(),
        "aggregate_type": b"order",
        "aggregate_id": str(n).encode(),
        "event_type": b"OrderCreated",
        "payload": b'{"n": %d}' % n,
        "headers": b"{}",
        "exchange": None,
        "routing_key": None,
        "created_at": b"2026-11-23 10:11:12+00",
    }
    values.update(overrides)
    return xlog(Insert(relid, tuple(values[c] for c in COLUMNS)))


def begin(final_lsn: int) -> bytes:
    return xlog(Begin(final_lsn, COMMIT_TS, 700))


def commit(commit_lsn: int, end_lsn: int) -> bytes:
    return xlog(Commit(0, commit_lsn, end_lsn, COMMIT_TS), end_lsn)


class Latencies(list[float]):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


EMIT_KEY = bytes(range(64))


def sign(body: bytes, key: bytes = EMIT_KEY) -> bytes:
    """What the emit function writes: the hex HMAC-SHA256 of the JSON, then the JSON."""
    return hmac.new(key, body, hashlib.sha256).hexdigest().encode() + body


def make_core(start_flush: int = 0, **kwargs: Any) -> tuple[SessionCore, Latencies]:
    latencies = Latencies()
    kwargs.setdefault("emit_key", EMIT_KEY)
    core = SessionCore(
        outbox_relid=OUTBOX,
        table="public.outbox",
        router=kwargs.pop("router", Router("outbox", "{aggregate_type}.{event_type}", "event")),
        start_flush=start_flush,
        max_message_size=kwargs.pop("max_message_size", 1 << 20),
        observe_commit_to_confirm=latencies,
        **kwargs,
    )
    return core, latencies


def feed(core: SessionCore, *frames: bytes) -> list[Any]:
    return [core.receive(f) for f in frames]


def transaction(core: SessionCore, lsn: int, *rows: bytes) -> list[Any]:
    """Begin, the rows, Commit (end_lsn = lsn + 0x30); returns the actions of the rows."""
    actions = feed(core, begin(lsn), *rows, commit(lsn, lsn + 0x30))
    assert actions[0] is None and actions[-1] is None
    return actions[1:-1]


def test_one_row_is_published_and_flushed_after_its_confirm() -> None:
    core, latencies = make_core()
    assert feed(core, relation()) == [None]
    [envelope] = transaction(core, 0x2000, insert(1))
    assert isinstance(envelope, Envelope)
    assert envelope.message_id == "00000000-0000-0000-0000-000000000001"
    assert envelope.routing_key == "order.OrderCreated"
    assert core.last_seq == 1
    assert core.tracker.flush_lsn == 0 and not core.status_due
    assert core.settle(Outcome([1], [], None), COMMIT_UNIX + 0.25) == []
    assert core.tracker.flush_lsn == 0x2030
    assert core.status_due and core.made_progress
    assert core.status_positions() == (0x2030, 0x2030)
    core.status_sent(0x2030)
    assert not core.status_due
    assert latencies == [pytest.approx(0.25)]


def test_the_flush_starts_at_the_slots_confirmed_position_and_never_goes_below() -> None:
    core, _ = make_core(start_flush=0x9000)
    assert core.status_positions() == (0x9000, 0x9000)
    feed(core, keepalive(0x100))  # an old keepalive position moves nothing
    assert core.tracker.flush_lsn == 0x9000 and not core.status_due


def test_insert_before_any_relation_ends_the_session() -> None:
    core, _ = make_core()
    feed(core, begin(0x2000))
    with pytest.raises(SessionFailed, match="before its Relation"):
        core.receive(insert(1))


def test_a_renamed_or_moved_outbox_is_still_the_outbox() -> None:
    """pgoutput names the relation as it is at decode time: the OID is what counts."""
    core, _ = make_core()
    feed(core, relation(name="outbox_tmp"))
    [envelope] = transaction(core, 0x2000, insert(1))
    assert isinstance(envelope, Envelope)
    feed(core, relation(name="outbox", namespace="archive"))
    [envelope] = transaction(core, 0x3000, insert(2))
    assert isinstance(envelope, Envelope)


def test_an_insert_into_another_published_table_is_a_dead_letter_not_a_skip() -> None:
    core, _ = make_core()
    feed(core, relation(), relation(OTHER, name="orders"))
    first, other, last = transaction(core, 0x2000, insert(1), insert(2, relid=OTHER), insert(3))
    assert isinstance(first, Envelope) and isinstance(last, Envelope)
    assert isinstance(other, PendingDeadLetter) and other.seq == 2
    assert "public.orders" in other.letter.reason and "not the outbox" in other.letter.reason
    assert other.letter.lsn == 0x2000
    core.settle(Outcome([1, 3], [], None), COMMIT_UNIX)
    assert core.tracker.flush_lsn == 0  # the dead letter is not stored yet
    core.stored([2], COMMIT_UNIX)
    assert core.tracker.flush_lsn == 0x2030


def test_a_recreated_outboxs_rows_are_dead_letters_that_replay_can_read() -> None:
    """Issue 16: a dropped and recreated outbox has a new OID until the next session;
    its rows' dead letters kept values without names, which replay could not read."""
    core, _ = make_core()
    feed(core, relation(), relation(OTHER, name="outbox"))
    (letter,) = transaction(core, 0x2000, insert(7, relid=OTHER))
    assert isinstance(letter, PendingDeadLetter) and "not the outbox" in letter.letter.reason
    assert letter.letter.outbox_id == "00000000-0000-0000-0000-000000000007"
    record = DeadLetterRecord(1, None, "", letter.letter.row, "0/2000", "", None)
    row = row_from_record(record)
    assert (row.aggregate_id, row.event_type, row.payload) == ("7", "OrderCreated", b'{"n": 7}')


def test_a_foreign_tables_dead_letters_keep_its_column_names() -> None:
    core, _ = make_core()
    columns = (Column(1, "sku", 25, -1), Column(0, "qty", 23, -1))
    feed(core, relation(), xlog(Relation(OTHER, "public", "stock", "d", columns)))
    (letter,) = transaction(core, 0x2000, xlog(Insert(OTHER, (b"A-1", b"3"))))
    assert isinstance(letter, PendingDeadLetter)
    assert letter.letter.row == {"values": ["A-1", "3"], "columns": ["sku", "qty"]}


def test_an_all_dead_letter_transaction_flushes_once_stored() -> None:
    core, latencies = make_core()
    feed(core, relation())
    actions = transaction(core, 0x2000, insert(1, payload=None), insert(2, payload=None))
    assert all(isinstance(a, PendingDeadLetter) for a in actions)
    # Unreadable rows keep their values and column names, and their id when it is readable.
    assert [a.letter.outbox_id for a in actions] == [
        "00000000-0000-0000-0000-000000000001",
        "00000000-0000-0000-0000-000000000002",
    ]
    assert actions[0].letter.row["values"][0] == "00000000-0000-0000-0000-000000000001"
    assert actions[0].letter.row["columns"][:5] == [
        "id",
        "aggregate_type",
        "aggregate_id",
        "event_type",
        "payload",
    ]
    assert "column payload is NULL" in actions[0].letter.reason
    core.stored([2, 1], COMMIT_UNIX + 1)
    assert core.tracker.flush_lsn == 0x2030
    assert latencies == [pytest.approx(1.0)]


def test_any_exception_while_routing_is_that_rows_dead_letter() -> None:
    class Exploding(Router):
        def route(self, row: Any) -> Envelope:
            if row.aggregate_id == "2":
                raise RecursionError("maximum recursion depth exceeded")
            return super().route(row)

    core, _ = make_core(router=Exploding("outbox", "{aggregate_type}.{event_type}", "event"))
    feed(core, relation())
    first, bad, last = transaction(core, 0x2000, insert(1), insert(2), insert(3))
    assert isinstance(bad, PendingDeadLetter)
    assert "RecursionError" in bad.letter.reason
    assert bad.letter.outbox_id == "00000000-0000-0000-0000-000000000002"
    assert isinstance(first, Envelope) and isinstance(last, Envelope)


def test_keepalive_outside_a_transaction_may_be_flushed_inside_it_may_not() -> None:
    core, _ = make_core()
    feed(core, relation())
    feed(core, keepalive(0x1500))
    assert core.tracker.flush_lsn == 0x1500 and core.status_due
    core.status_sent(0x1500)
    feed(core, begin(0x2000), insert(1), keepalive(0x5000, reply=True))
    assert core.tracker.flush_lsn == 0x1500
    assert core.status_due  # the server asked for a reply
    assert core.status_positions() == (0x5000, 0x1500)
    core.status_sent(0x1500)
    assert not core.status_due


def test_stop_in_the_middle_of_a_transaction_answers_stop_at_its_commit() -> None:
    core, _ = make_core()
    feed(core, relation(), begin(0x2000), insert(1))
    assert core.in_transaction
    core.stop_requested = True
    assert core.receive(insert(2)) is not STOP
    assert core.receive(commit(0x2000, 0x2030)) is STOP
    assert not core.in_transaction


def test_a_returned_message_is_dead_lettered_with_its_own_transactions_lsn() -> None:
    core, _ = make_core()
    feed(core, relation())
    transaction(core, 0x2000, insert(1))
    transaction(core, 0x3000, insert(2))
    feed(core, begin(0x4000), insert(3))  # the pump is inside a later transaction
    returned = PublishFailed("returned by broker: 312 NO_ROUTE", returned=True, reply_code=312)
    letters = core.settle(Outcome([1], [(2, returned)], None), COMMIT_UNIX)
    assert [(p.seq, p.letter.lsn) for p in letters] == [(2, 0x3000)]
    assert letters[0].letter.outbox_id == "00000000-0000-0000-0000-000000000002"
    assert "NO_ROUTE" in letters[0].letter.reason
    # returned in the open transaction: that transaction's LSN
    [open_letter] = core.settle(Outcome([], [(3, returned)], None), COMMIT_UNIX)
    assert open_letter.letter.lsn == 0x4000


def test_a_return_with_on_unroutable_fail_ends_the_session() -> None:
    core, _ = make_core(dead_letter_unroutable=False)
    feed(core, relation())
    transaction(core, 0x2000, insert(1))
    returned = PublishFailed("returned by broker: 312 NO_ROUTE", returned=True, reply_code=312)
    with pytest.raises(SessionFailed, match="NO_ROUTE"):
        core.settle(Outcome([], [(1, returned)], None), COMMIT_UNIX)


def test_a_nack_or_a_lost_connection_ends_the_session() -> None:
    core, _ = make_core()
    feed(core, relation())
    transaction(core, 0x2000, insert(1), insert(2))
    with pytest.raises(SessionFailed, match="nacked"):
        core.settle(Outcome([], [(1, PublishFailed("nacked by broker"))], None), COMMIT_UNIX)
    core, _ = make_core()
    feed(core, relation())
    transaction(core, 0x2000, insert(1), insert(2))
    with pytest.raises(SessionFailed, match="connection lost"):
        core.settle(Outcome([], [], PublishFailed("AMQP connection lost")), COMMIT_UNIX)


def test_after_session_failed_the_core_reads_nothing_more_but_takes_earlier_acks() -> None:
    """Like h11's ERROR state: nothing new is read or published on a session that failed.

    The acks of what was published before the nack still count (relay settles them).
    """
    core, _ = make_core()
    feed(core, relation())
    transaction(core, 0x2000, insert(1))
    transaction(core, 0x3000, insert(2), insert(3))
    with pytest.raises(PublishRefused, match="nacked"):
        core.settle(Outcome([], [(2, PublishFailed("nacked by broker"))], None), COMMIT_UNIX)
    assert isinstance(core.failure, PublishRefused)
    with pytest.raises(SessionFailed, match="failed already: publish of message 2 failed"):
        core.receive(keepalive(0x9000))
    with pytest.raises(SessionFailed, match="failed already"):
        core.unpublishable(3, "too big")
    assert core.received_lsn < 0x9000
    assert core.settle(Outcome([1], [], None), COMMIT_UNIX) == []  # published before the nack
    assert core.flush_lsn > 0 and core.unconfirmed == 2  # the nacked row and row 3


def test_an_insert_before_its_relation_puts_the_core_in_the_error_state() -> None:
    core, _ = make_core()
    with pytest.raises(SessionFailed, match="before its Relation"):
        transaction(core, 0x2000, insert(1))
    with pytest.raises(SessionFailed, match="failed already"):
        feed(core, relation())


def refused(exchange: str, code: int = 404) -> PublishFailed:
    """The channel close a publish to a missing (404) or forbidden (403) exchange causes."""
    error = PublishFailed(f"channel closed: {code} no exchange '{exchange}'", reply_code=code)
    error.refused_exchange = exchange
    return error


def test_a_refused_exchange_is_remembered_and_its_rows_are_dead_lettered_next_session() -> None:
    limits = BrokerLimits.empty("outbox")
    core, _ = make_core(limits=limits)
    feed(core, relation())
    transaction(core, 0x2000, insert(1, exchange=b"nope"))
    lost = refused("nope")
    lost.culprit_seq = 1  # filled in by the confirm window
    with pytest.raises(SessionFailed, match=r"outbox row 0+-0+-0+-0+-0+1\).*dead-lettered"):
        core.settle(Outcome([], [], lost), COMMIT_UNIX)
    replay, _ = make_core(limits=limits)
    feed(replay, relation())
    recheck, good = transaction(replay, 0x2000, insert(1, exchange=b"nope"), insert(2))
    assert isinstance(recheck, Recheck) and isinstance(good, Envelope)
    assert limits.recheck_due("nope", 10, now=100.0)
    limits.rechecked("nope", 10, refused("nope"), now=100.0)  # the broker still refuses it
    bad = replay.rechecked(recheck)
    assert isinstance(bad, PendingDeadLetter) and "nope" in bad.letter.reason
    assert bad.letter.lsn == 0x2000


def test_a_remembered_refusal_is_asked_again_every_few_seconds_and_forgotten_when_healed() -> None:
    """Deleting an exchange once, or revoking a permission for seconds, must not last for ever."""
    limits = BrokerLimits.empty("outbox")
    assert limits.learn(refused("orders", 403)) and not limits.recheck_due("other", 10, 0.0)
    assert limits.recheck_due("orders", 10, now=50.0)  # never asked since it was learned
    limits.rechecked("orders", 10, refused("orders", 403), now=50.0)
    assert not limits.recheck_due("orders", 10, now=50.0 + RECHECK_INTERVAL - 0.1)
    assert limits.recheck_due("orders", 10, now=50.0 + RECHECK_INTERVAL)
    limits.connected()  # a new connection: due at once
    assert limits.recheck_due("orders", 10, now=50.1)
    assert limits.rechecked("orders", 10, None, now=51.0)  # the broker took the trial publish
    assert limits.refusal("orders", 10) is None and not limits.refuses()

    core, _ = make_core(limits=limits)
    feed(core, relation())
    limits.learn(refused("orders"))
    [recheck] = transaction(core, 0x2000, insert(1, exchange=b"orders"))
    assert isinstance(recheck, Recheck)
    limits.rechecked("orders", 10, None, now=60.0)
    envelope = core.rechecked(recheck)
    assert isinstance(envelope, Envelope) and envelope.exchange == "orders"
    assert core.settle(Outcome([1], [], None), COMMIT_UNIX) == []
    assert core.tracker.flush_lsn == 0x2030


def test_the_relays_own_exchange_is_never_remembered_as_refused() -> None:
    """Every row without its own exchange goes there: a refusal is an outage, so retry."""
    limits = BrokerLimits.empty("outbox")
    core, _ = make_core(limits=limits)
    feed(core, relation())
    transaction(core, 0x2000, insert(1))
    lost = refused("outbox")
    lost.culprit_seq = 1
    with pytest.raises(SessionFailed) as failed:
        core.settle(Outcome([], [], lost), COMMIT_UNIX)
    assert "dead-lettered" not in str(failed.value)
    assert not limits.refuses()
    replay, _ = make_core(limits=limits)
    feed(replay, relation())
    assert isinstance(transaction(replay, 0x2000, insert(1))[0], Envelope)


def test_a_body_over_the_brokers_limit_is_dead_lettered_after_the_broker_said_so() -> None:
    limits = BrokerLimits.empty()
    lost = PublishFailed("406 PRECONDITION_FAILED - message size 20 is larger than max size 10")
    lost.broker_max_message_size = 10
    assert limits.learn(lost)
    core, _ = make_core(limits=limits)
    feed(core, relation())
    [recheck] = transaction(core, 0x2000, insert(1, payload=b'{"much": "too long"}'))
    assert isinstance(recheck, Recheck) and limits.recheck_due("outbox", 200, now=1.0)
    limits.rechecked("outbox", 200, lost, now=1.0)
    assert not limits.recheck_due("outbox", 200, now=2.0)
    dead = core.rechecked(recheck)
    assert isinstance(dead, PendingDeadLetter) and "exceeds" in dead.letter.reason
    limits.connected()  # the limit is asked again on each connection
    assert limits.recheck_due("outbox", 200, now=2.0)
    assert limits.rechecked("outbox", 200, None, now=2.0)  # raised since: forgotten
    assert limits.max_message_size is None


def test_unpublishable_envelope_becomes_a_dead_letter() -> None:
    core, _ = make_core()
    feed(core, relation(), begin(0x2000))
    envelope = core.receive(insert(1))
    assert isinstance(envelope, Envelope)
    pending = core.unpublishable(core.last_seq, "header block of 200000 bytes exceeds frame_max")
    assert pending.seq == 1 and "frame_max" in pending.letter.reason
    feed(core, commit(0x2000, 0x2030))
    core.stored([1], COMMIT_UNIX)
    assert core.tracker.flush_lsn == 0x2030


def test_rows_written_while_required_columns_were_gone_are_dead_letters() -> None:
    """DDL while streaming: the Relation of then lacks columns; later rows flow again."""
    core, _ = make_core()
    columns = (Column(1, "id", 25, -1), Column(0, "payload", 25, -1))
    feed(core, xlog(Relation(OUTBOX, "public", "outbox", "d", columns)), begin(0x2000))
    dead = core.receive(xlog(Insert(OUTBOX, (b"00000000-0000-0000-0000-000000000007", b"{}"))))
    assert isinstance(dead, PendingDeadLetter) and dead.seq == 1
    letter = dead.letter
    assert "lacks column(s): aggregate_type, aggregate_id, event_type" in letter.reason
    assert letter.outbox_id == "00000000-0000-0000-0000-000000000007"
    assert letter.row == {
        "values": ["00000000-0000-0000-0000-000000000007", "{}"],
        "columns": ["id", "payload"],
    }
    feed(core, commit(0x2000, 0x2030), relation(), begin(0x3000))
    assert isinstance(core.receive(insert(2)), Envelope)  # the table is whole again


# -- commit-to-confirm latency (was CommitClock; now the core's per-transaction records) --


def test_latency_a_transaction_finishes_when_its_last_message_is_confirmed() -> None:
    core, latencies = make_core()
    feed(core, relation())
    transaction(core, 0x2000, insert(1), insert(2), insert(3))
    transaction(core, 0x3000, insert(4))
    core.settle(Outcome([1, 2], [], None), COMMIT_UNIX + 1.0)
    assert latencies == []
    core.settle(Outcome([3], [], None), COMMIT_UNIX + 1.0)
    assert latencies == [pytest.approx(1.0)]
    core.settle(Outcome([4], [], None), COMMIT_UNIX + 1.5)
    assert latencies == [pytest.approx(1.0), pytest.approx(1.5)]


def test_latency_one_multiple_ack_finishes_several_in_commit_order() -> None:
    core, latencies = make_core()
    feed(core, relation())
    for n, lsn in ((1, 0x2000), (2, 0x3000), (3, 0x4000)):
        transaction(core, lsn, insert(n))
    core.settle(Outcome([1, 2, 3], [], None), COMMIT_UNIX + 2.0)
    assert latencies == [pytest.approx(2.0)] * 3


def test_latency_clock_skew_never_gives_negative_latency() -> None:
    core, latencies = make_core()
    feed(core, relation())
    transaction(core, 0x2000, insert(1))
    core.settle(Outcome([1], [], None), COMMIT_UNIX - 5.0)
    assert latencies == [0.0]


def test_latency_transactions_without_outbox_rows_are_not_observed() -> None:
    core, latencies = make_core()
    feed(core, relation(), begin(0x2000), commit(0x2000, 0x2030))
    transaction(core, 0x3000, insert(1))
    core.settle(Outcome([1], [], None), COMMIT_UNIX + 1.0)
    assert latencies == [pytest.approx(1.0)]


# -- outbox_emit: transactional logical messages are rows without a table --


def emitted(
    n: int, *, transactional: bool = True, prefix: str = "cdc_relay", **extra: Any
) -> bytes:
    content = {
        "id": f"00000000-0000-0000-0000-{n:012d}",
        "aggregate_type": "order",
        "aggregate_id": str(n),
        "event_type": "Emitted",
        "payload": f'{{"n": {n}}}',
        "headers": '{"tenant": "acme"}',
        "exchange": None,
        "routing_key": None,
        "created_at": "2026-11-28T09:40:00.123456+00:00",
        **extra,
    }
    return xlog(LogicalMessage(transactional, 0x2010, prefix, sign(orjson.dumps(content))))


def test_an_emitted_message_maps_exactly_like_a_row_in_statement_order() -> None:
    core, _ = make_core()
    feed(core, relation())
    row, message, row2 = transaction(core, 0x2000, insert(1), emitted(2), insert(3))
    assert [a.message_id for a in (row, message, row2)] == [
        f"00000000-0000-0000-0000-{n:012d}" for n in (1, 2, 3)
    ]
    assert message.body == b'{"n": 2}'
    assert message.routing_key == "order.Emitted"
    assert message.headers["tenant"] == "acme"
    assert message.timestamp is not None
    core.settle(Outcome([1, 2, 3], [], None), COMMIT_UNIX)
    assert core.tracker.flush_lsn == 0x2030


def test_messages_with_another_prefix_are_not_ours() -> None:
    core, _ = make_core()
    [action] = transaction(core, 0x2000, emitted(1, prefix="someone_else"))
    assert action is None and core.last_seq == 0


def test_a_non_transactional_message_is_refused_and_holds_the_flush_until_stored() -> None:
    core, _ = make_core()
    feed(core, keepalive(0x1000))
    dead = core.receive(emitted(1, transactional=False))
    assert isinstance(dead, PendingDeadLetter)
    assert "non-transactional" in dead.letter.reason
    assert dead.letter.lsn == 0x2010
    feed(core, keepalive(0x3000))
    assert core.tracker.flush_lsn == 0x1000
    core.stored([dead.seq], COMMIT_UNIX)
    assert core.tracker.flush_lsn == 0x3000


def test_an_unreadable_emitted_message_is_a_dead_letter() -> None:
    core, _ = make_core()
    content = sign(b"{not json")
    [dead] = transaction(core, 0x2000, xlog(LogicalMessage(True, 0x2010, "cdc_relay", content)))
    assert isinstance(dead, PendingDeadLetter)
    assert dead.letter.row["values"] == [content.decode()]


def test_an_emitted_message_not_signed_with_the_key_is_dead_lettered_never_published() -> None:
    """Any role may call pg_logical_emit_message with our prefix: only the key tells ours."""
    body = orjson.dumps({"id": "00000000-0000-0000-0000-000000000009", "aggregate_type": "o",
                         "aggregate_id": "1", "event_type": "Forged", "payload": "{}"})  # fmt: skip
    other = body.replace(b"Forged", b"Forgex")
    forgeries = [
        body,  # unsigned, as the old emit function wrote them
        sign(body, bytes(64)),  # signed with another key
        sign(other)[:64] + body,  # a real signature of another message
        sign(body)[:-1],  # truncated
        b"0" * 10,  # too short to hold a signature
    ]
    core, _ = make_core()
    actions = transaction(
        core, 0x2000, *(xlog(LogicalMessage(True, 0x2010, "cdc_relay", f)) for f in forgeries)
    )
    assert all(isinstance(a, PendingDeadLetter) for a in actions), actions
    assert {a.letter.reason for a in actions} == {EMIT_AUTH_FAILED}
    assert [a.letter.row["values"] for a in actions] == [[f.decode()] for f in forgeries]
    # Without a key (the outbox does not use emitted messages) nothing is authentic.
    keyless, _ = make_core(emit_key=None)
    [action] = transaction(
        keyless, 0x2000, xlog(LogicalMessage(True, 0x2010, "cdc_relay", sign(body)))
    )
    assert isinstance(action, PendingDeadLetter) and action.letter.reason == EMIT_AUTH_FAILED
    assert authenticated(sign(body), EMIT_KEY) == body


def test_importing_the_core_loads_no_io_library() -> None:
    """The core is sans-I/O: it must load without asyncio, ssl, psycopg or pamqp."""
    probe = (
        "import sys; import cdc_relay.core; "
        "print(sorted(m for m in ('asyncio', 'ssl', 'psycopg', 'pamqp') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


# -- reason codes: the metrics' reason label and the log line's reason field ---------------


def test_dead_letters_and_publish_failures_are_counted_by_reason_code() -> None:
    metrics = Metrics("s")
    core, _ = make_core(counters=metrics, max_message_size=200)
    feed(core, relation(), relation(OUTBOX + 1, "other"))
    actions = transaction(
        core,
        0x2000,
        insert(1, headers=b"[1]"),  # bad_row
        insert(2, payload=b'"' + b"x" * 300 + b'"'),  # too_large
        insert(3, relid=OUTBOX + 1),  # not_outbox
        insert(4),  # published, then returned
        insert(5),  # published, then lost with the connection
    )
    letters = [a for a in actions if isinstance(a, PendingDeadLetter)]
    assert [p.letter.code for p in letters] == ["bad_row", "too_large", "not_outbox"]
    returned = PublishFailed("returned by broker: 312 NO_ROUTE", returned=True, reply_code=312)
    [unroutable] = core.settle(Outcome([], [(4, returned)], None), COMMIT_UNIX)
    assert unroutable.letter.code == "unroutable"
    core.stored([p.seq for p in [*letters, unroutable]], COMMIT_UNIX)
    assert metrics.dead_lettered.values == {
        **dict.fromkeys(reasons.DEAD_LETTER_REASONS, 0),
        "bad_row": 1,
        "too_large": 1,
        "not_outbox": 1,
        "unroutable": 1,
    }
    lost = PublishFailed("no confirm within 30s", code=reasons.TIMEOUT)
    with pytest.raises(SessionFailed) as ended:
        core.settle(Outcome(lost=lost), COMMIT_UNIX)
    assert ended.value.code == "timeout"
    # The return and the one publish lost with the timeout.
    assert {k: v for k, v in metrics.publish_failures.values.items() if v} == {
        "unroutable": 1,
        "timeout": 1,
    }


def test_a_nack_is_counted_as_nack_and_names_its_reason() -> None:
    metrics = Metrics("s")
    core, _ = make_core(counters=metrics)
    feed(core, relation())
    transaction(core, 0x2000, insert(1))
    nack = ConfirmWindow(10, 1 << 20)
    nack.add(1, "m1", "x", 1, 0.0)
    [(_, error)] = nack.nack(1, False).failed
    with pytest.raises(SessionFailed) as ended:
        core.settle(Outcome([], [(1, error)], None), COMMIT_UNIX)
    assert ended.value.code == "nack"
    assert metrics.publish_failures.values["nack"] == 1


def test_the_core_reads_through_the_routers_layout() -> None:
    """A Debezium relation: read by its columns; a NULL payload's dead letter keeps the id."""
    names = ("event_id", "aggregatetype", "aggregateid", "type", "payload")
    layout = build_layout("debezium", ["id=event_id"])
    core, _ = make_core(router=Router(layout=layout))
    columns = tuple(Column(0, c, 25, -1) for c in names)
    feed(core, xlog(Relation(OUTBOX, "public", "outboxevent", "d", columns)))
    good = xlog(Insert(OUTBOX, (b"e-1", b"order", b"7", b"Paid", b"{}")))
    tombstone = xlog(Insert(OUTBOX, (b"e-2", b"order", b"7", b"Paid", None)))
    envelope, letter = transaction(core, 0x2000, good, tombstone)
    assert isinstance(envelope, Envelope)
    assert (envelope.message_id, envelope.routing_key) == ("e-1", "order.Paid")
    assert isinstance(letter, PendingDeadLetter)
    assert letter.letter.outbox_id == "e-2"
    assert "column payload is NULL" in letter.letter.reason
    assert letter.letter.row["columns"] == list(names)

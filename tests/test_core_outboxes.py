"""The session core with several outboxes on one slot (pure: frames in, actions out)."""

from __future__ import annotations

from cdc_relay import reasons
from cdc_relay.amqp import Outcome, PublishFailed
from cdc_relay.core import Outbox, SessionCore
from cdc_relay.envelope import Envelope
from cdc_relay.letters import PendingDeadLetter
from cdc_relay.metrics import Metrics
from cdc_relay.router import Router
from tests.test_core import COMMIT_UNIX, OUTBOX, begin, commit, feed, insert, relation

ORDERS, BILLING, STRAY = OUTBOX, OUTBOX + 1, OUTBOX + 2


def make(metrics: Metrics | None = None) -> SessionCore:
    metrics = metrics or Metrics("s", ["public.orders", "billing.outbox"])
    return SessionCore(
        outboxes=[
            Outbox(
                ORDERS, "public.orders", Router("orders", "o.{event_type}", "event"),
                metrics.table("public.orders"),
            ),
            Outbox(
                BILLING, "billing.outbox", Router("billing", "b.{event_type}", "event"),
                metrics.table("billing.outbox"),
            ),
        ],
        start_flush=0,
        max_message_size=1 << 20,
        counters=metrics,
    )  # fmt: skip


def test_each_table_is_routed_by_its_own_router_in_commit_order() -> None:
    core = make()
    feed(core, relation(ORDERS, "orders"), relation(BILLING, "outbox", "billing"))
    actions = feed(
        core,
        begin(0x2000),
        insert(1, relid=ORDERS),
        insert(2, relid=BILLING),
        insert(3, relid=ORDERS),
        commit(0x2000, 0x2030),
    )[1:-1]
    assert all(type(a) is Envelope for a in actions)
    assert [(a.exchange, a.routing_key) for a in actions] == [
        ("orders", "o.OrderCreated"),
        ("billing", "b.OrderCreated"),
        ("orders", "o.OrderCreated"),
    ]
    # One slot, one flush: it moves only when every table's rows are confirmed.
    core.settle(Outcome([1, 3]), COMMIT_UNIX)
    assert core.flush_lsn == 0
    core.settle(Outcome([2]), COMMIT_UNIX)
    assert core.flush_lsn == 0x2030


def test_counters_and_dead_letters_belong_to_the_row_s_table() -> None:
    metrics = Metrics("s", ["public.orders", "billing.outbox"])
    core = make(metrics)
    feed(
        core,
        relation(ORDERS, "orders"),
        relation(BILLING, "outbox", "billing"),
        relation(STRAY, "stray"),
    )
    actions = feed(
        core,
        begin(0x2000),
        insert(1, relid=ORDERS),
        insert(2, relid=BILLING, headers=b"[1]"),  # a bad row of billing
        insert(3, relid=BILLING),  # published, then returned
        insert(4, relid=STRAY),  # no outbox: the first outbox's dead letter
        commit(0x2000, 0x2030),
    )[1:-1]
    letters = [a for a in actions if isinstance(a, PendingDeadLetter)]
    assert [(p.letter.table, p.letter.code) for p in letters] == [
        ("billing.outbox", "bad_row"),
        ("public.orders", "not_outbox"),
    ]
    assert "one of the outboxes public.orders" in letters[1].letter.reason
    returned = PublishFailed("returned by broker: 312 NO_ROUTE", returned=True, reply_code=312)
    [unroutable] = core.settle(Outcome([1], [(3, returned)], None), COMMIT_UNIX)
    assert (unroutable.letter.table, unroutable.letter.code) == ("billing.outbox", "unroutable")
    core.stored([p.seq for p in [*letters, unroutable]], COMMIT_UNIX)
    assert core.flush_lsn == 0x2030
    orders, billing = metrics.table("public.orders"), metrics.table("billing.outbox")
    assert (orders.published.value, orders.confirmed.value) == (1, 1)
    assert (billing.published.value, billing.confirmed.value) == (1, 0)
    assert {k: v for k, v in billing.dead_lettered.values.items() if v} == {
        reasons.BAD_ROW: 1,
        reasons.UNROUTABLE: 1,
    }
    assert {k: v for k, v in orders.dead_lettered.values.items() if v} == {reasons.NOT_OUTBOX: 1}
    assert metrics.confirmed.value == 1 and metrics.published.value == 2
    text = metrics.render().decode()
    assert 'cdc_relay_messages_confirmed_total{slot="s",table="public.orders"} 1.0' in text
    assert 'cdc_relay_messages_confirmed_total{slot="s",table="billing.outbox"} 0.0' in text
    assert text.count("# TYPE cdc_relay_messages_confirmed_total counter") == 1
    assert (
        'cdc_relay_messages_dead_lettered_total{reason="unroutable",slot="s",'
        'table="billing.outbox"} 1.0' in text
    )

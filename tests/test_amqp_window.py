"""The confirm window on its own: no loop, no socket, every settling rule."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cdc_relay.amqp.window import ConfirmWindow, Outcome, PublishFailed


def window_with(count: int, limit: int = 100, byte_limit: int = 10**9) -> ConfirmWindow:
    window = ConfirmWindow(limit, byte_limit)
    for n in range(1, count + 1):
        assert window.add(100 + n, f"id-{n}", "ex", 10, float(n)) == n  # tags 1.., seqs 101..
    return window


def returned_error(code: int = 312) -> PublishFailed:
    return PublishFailed(f"returned by broker: {code} NO_ROUTE", returned=True, reply_code=code)


def test_multiple_ack_confirms_in_order_and_single_acks_out_of_order() -> None:
    window = window_with(5)
    assert window.ack(3, multiple=True) == Outcome(confirmed=[101, 102, 103])
    assert window.ack(5, multiple=False) == Outcome(confirmed=[105])
    assert window.in_flight == 1 and window.oldest_sent_at == 4.0
    assert window.ack(4, multiple=False) == Outcome(confirmed=[104])
    assert window.empty and window.in_flight_bytes == 0 and window.oldest_sent_at is None


def test_multiple_ack_skips_what_single_acks_already_settled() -> None:
    window = window_with(4)
    assert window.ack(2, multiple=False).confirmed == [102]
    assert window.ack(4, multiple=True).confirmed == [101, 103, 104]
    assert window.empty


def test_a_multiple_ack_ending_before_an_out_of_order_ack_leaves_no_settled_front() -> None:
    """The confirm timeout runs from the oldest unsettled publish, never from a settled one."""
    window = window_with(4)
    assert window.ack(3, multiple=False).confirmed == [103]
    assert window.ack(2, multiple=True).confirmed == [101, 102]
    assert window.in_flight == 1 and window.oldest_sent_at == 4.0
    assert window.ack(4, multiple=False).confirmed == [104]
    assert window.empty and window.oldest_sent_at is None


def test_nack_multiple_fails_each_and_confirms_none() -> None:
    window = window_with(3)
    outcome = window.nack(2, multiple=True)
    assert outcome.confirmed == [] and [seq for seq, _ in outcome.failed] == [101, 102]
    assert all("nack" in error.reason and not error.returned for _, error in outcome.failed)
    assert window.ack(3, multiple=False).confirmed == [103]


def test_return_then_ack_is_a_failure() -> None:
    window = window_with(2)
    error = returned_error()
    window.returned("id-1", error)
    assert window.in_flight == 2  # a return settles nothing until its ack
    assert window.ack(1, multiple=False) == Outcome(failed=[(101, error)])


def test_return_inside_a_multiple_ack_fails_only_that_one() -> None:
    window = window_with(5)
    window.returned("id-3", returned_error())
    outcome = window.ack(5, multiple=True)
    assert outcome.confirmed == [101, 102, 104, 105]
    assert [(seq, error.returned) for seq, error in outcome.failed] == [(103, True)]


def test_a_returned_message_that_is_nacked_reports_the_return() -> None:
    window = window_with(1)
    error = returned_error()
    window.returned("id-1", error)
    assert window.nack(1, multiple=False).failed == [(101, error)]


def test_duplicate_unknown_and_future_acks_settle_nothing() -> None:
    window = window_with(2)
    assert window.ack(1, multiple=False).confirmed == [101]
    assert not window.ack(1, multiple=False)
    assert not window.ack(1, multiple=True)
    assert not window.ack(9, multiple=False)
    assert not window.ack(0, multiple=True)
    assert window.in_flight == 1


def test_an_unmatched_return_is_a_failure_not_ignored() -> None:
    window = window_with(2)
    with pytest.raises(PublishFailed, match="matches no unsettled publish"):
        window.returned("id-unknown", returned_error())
    window.ack(1, multiple=False)
    with pytest.raises(PublishFailed, match="id-1"):
        window.returned("id-1", returned_error())  # already confirmed


def test_a_second_return_for_the_same_publish_is_a_failure() -> None:
    window = window_with(1)
    window.returned("id-1", returned_error())
    with pytest.raises(PublishFailed):
        window.returned("id-1", returned_error())


def test_one_unsettled_publish_per_message_id() -> None:
    window = window_with(1)
    assert window.has_unsettled("id-1") and not window.has_unsettled("id-2")
    with pytest.raises(ValueError, match="already unsettled"):
        window.add(7, "id-1", "ex", 1, 0.0)
    window.ack(1, multiple=False)
    assert not window.has_unsettled("id-1")
    assert window.add(7, "id-1", "ex", 1, 0.0) == 2


def test_fail_all_loses_everything_once_and_then_reports_nothing() -> None:
    window = window_with(3)
    window.ack(1, multiple=False)
    error = PublishFailed("AMQP connection lost")
    assert window.fail_all(error) == Outcome(lost=error)
    assert window.empty and window.in_flight_bytes == 0
    assert not window.ack(3, multiple=True)
    assert not window.fail_all(PublishFailed("again"))
    with pytest.raises(PublishFailed):
        window.add(200, "id-new", "ex", 1, 0.0)


def test_fail_all_names_the_culprit_of_a_refused_exchange_or_size() -> None:
    window = ConfirmWindow(10, 10**9)
    window.add(1, "a", "good", 10, 0.0)
    window.add(2, "b", "missing", 10, 0.0)
    window.add(3, "c", "missing", 10, 0.0)
    window.ack(1, multiple=False)
    refused = PublishFailed("404", reply_code=404, refused_exchange="missing")
    assert window.fail_all(refused).lost is refused
    assert refused.culprit_seq == 2

    window = ConfirmWindow(10, 10**9)
    window.add(1, "a", "ex", 100, 0.0)
    window.add(2, "b", "ex", 5000, 0.0)
    too_big = PublishFailed("406", reply_code=406, broker_max_message_size=1000)
    window.fail_all(too_big)
    assert too_big.culprit_seq == 2

    window = ConfirmWindow(10, 10**9)
    window.add(1, "a", "ex", 100, 0.0)
    plain = PublishFailed("connection lost")
    window.fail_all(plain)
    assert plain.culprit_seq is None


def test_count_limit() -> None:
    window = window_with(2, limit=2)
    assert window.full
    window.ack(1, multiple=False)
    assert not window.full


def test_byte_budget_and_a_single_oversized_message() -> None:
    window = ConfirmWindow(100, byte_limit=1000)
    assert not window.full
    window.add(1, "big", "ex", 5000, 0.0)  # allowed: the window was empty
    assert window.full and window.in_flight_bytes == 5000
    window.ack(1, multiple=False)
    assert not window.full
    window.add(2, "a", "ex", 600, 0.0)
    assert not window.full
    window.add(3, "b", "ex", 600, 0.0)
    assert window.full and window.in_flight_bytes == 1200
    window.ack(2, multiple=True)
    assert not window.full and window.in_flight_bytes == 600


# -- property test against a simple model -----------------------------------------------

events = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(1, 500)),
        st.tuples(st.sampled_from(["ack", "nack"]), st.integers(0, 60), st.booleans()),
        st.tuples(st.just("return"), st.integers(0, 60)),
    ),
    max_size=120,
)


@settings(max_examples=300, deadline=None)
@given(events)
@example([("add", 1)] * 4 + [("ack", 3, False), ("ack", 2, True)])  # front settled earlier
@example([("add", 1)] * 4 + [("nack", 3, False), ("ack", 2, True)])
def test_window_matches_a_simple_model(script: list[tuple]) -> None:
    """Every publish is settled at most once, with the verdict the model gives it."""
    window = ConfirmWindow(1000, 10**9)
    model: dict[int, tuple[int, str, int, bool]] = {}  # tag -> seq, id, size, returned
    settled: dict[int, bool] = {}  # seq -> confirmed?
    next_tag = 1
    for event in script:
        if event[0] == "add":
            seq = next_tag * 10
            tag = window.add(seq, f"m{next_tag}", "ex", event[1], float(next_tag))
            assert tag == next_tag
            model[tag] = (seq, f"m{tag}", event[1], False)
            next_tag += 1
        elif event[0] == "return":
            tag = event[1]
            if tag in model and not model[tag][3]:
                window.returned(f"m{tag}", returned_error())
                seq, mid, size, _ = model[tag]
                model[tag] = (seq, mid, size, True)
            else:
                with pytest.raises(PublishFailed):
                    window.returned(f"m{tag}", returned_error())
        else:
            kind, tag, multiple = event
            outcome = window.ack(tag, multiple) if kind == "ack" else window.nack(tag, multiple)
            known = tag < next_tag  # an ack of a tag never sent is ignored, not clamped
            tags = sorted(t for t in model if known and (t <= tag if multiple else t == tag))
            expected_confirmed = [model[t][0] for t in tags if kind == "ack" and not model[t][3]]
            expected_failed = [model[t][0] for t in tags if kind == "nack" or model[t][3]]
            assert outcome.confirmed == expected_confirmed
            assert [seq for seq, _ in outcome.failed] == expected_failed
            for t in tags:
                seq = model.pop(t)[0]
                assert seq not in settled
                settled[seq] = seq in expected_confirmed
        assert window.in_flight == len(model)
        assert window.in_flight_bytes == sum(entry[2] for entry in model.values())
        assert window.oldest_sent_at == (float(min(model)) if model else None)
        for _, mid, _, _ in model.values():
            assert window.has_unsettled(mid)

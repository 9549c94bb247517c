"""The confirm window: which publishes are unsettled, and what each ack, nack or return means.

Pure bookkeeping, no asyncio and no sockets, so every rule is unit tested
without a broker. Delivery tags on a confirm channel are consecutive from 1,
so the tag of an entry is its position in the window plus the tag of the
oldest entry: one deque of tuples indexed by arithmetic replaces the per-tag
dict and the per-message record object; the rare states (returned, settled
out of order) live in a small dict keyed by tag that the hot path (add +
``multiple`` ack) only checks for emptiness.

Rules:
- A ``basic.return`` precedes the ack of the same publish and is matched by
  message id; the window holds at most one unsettled publish per id (the
  publisher waits for ``can_add`` before reusing one), so the match is
  unambiguous. A return that matches nothing is a protocol failure: treating it
  as harmless would let the dropped message count as confirmed later.
- Each publish is reported once: confirmed, failed (nack or return), or lost
  with everything else when the connection or channel goes.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from cdc_relay import reasons
from cdc_relay.errors import SessionError

# Entry states; a PublishFailed in ``_marks`` means "returned".
_PENDING = None
_SETTLED = False


class PublishFailed(SessionError):
    """The broker did not take a message: nack, return, or lost channel/connection.

    ``refused_exchange`` names the exchange of a channel close (404 missing,
    403 forbidden) and ``broker_max_message_size`` the limit of a 406 "message
    size" close; ``culprit_seq`` is then the publish that caused it, filled in
    by ``ConfirmWindow.fail_all``, so the caller can dead-letter that one row.
    ``code`` is its label in metrics and logs (``reasons.PUBLISH_FAILURE_REASONS``):
    by default ``unroutable`` for a return, else ``connection_lost``.
    """

    def __init__(
        self,
        reason: str,
        *,
        returned: bool = False,
        reply_code: int | None = None,
        refused_exchange: str | None = None,
        broker_max_message_size: int | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code or (reasons.UNROUTABLE if returned else reasons.CONNECTION_LOST)
        self.returned = returned
        self.reply_code = reply_code
        self.refused_exchange = refused_exchange
        self.broker_max_message_size = broker_max_message_size
        self.culprit_seq: int | None = None


@dataclass(slots=True)
class Outcome:
    """What one broker event settled.

    ``confirmed``: sequence numbers, increasing. ``failed``: publishes the
    broker refused (nack or return). ``lost``: the connection or channel is
    gone; nothing else will be reported after it.
    """

    confirmed: list[int] = field(default_factory=list)
    failed: list[tuple[int, PublishFailed]] = field(default_factory=list)
    lost: PublishFailed | None = None

    def __bool__(self) -> bool:
        return bool(self.confirmed or self.failed or self.lost)


class ConfirmWindow:
    """Unsettled publishes of one confirm channel, oldest first."""

    __slots__ = (
        "_by_id",
        "_bytes",
        "_entries",
        "_first_tag",
        "_lost",
        "_marks",
        "_next_tag",
        "_unsettled",
        "byte_limit",
        "limit",
    )

    def __init__(self, limit: int, byte_limit: int) -> None:
        if limit < 1 or byte_limit < 1:
            raise ValueError("the confirm window needs room for at least one message")
        self.limit = limit
        self.byte_limit = byte_limit
        self._first_tag = 1  # tag of _entries[0]
        self._next_tag = 1
        # One (seq, message id, exchange, size, sent at) per publish, oldest first.
        self._entries: deque[tuple[int, str, str, int, float]] = deque()
        # The rare cases, by tag: returned (its error) or settled out of order (_SETTLED).
        self._marks: dict[int, PublishFailed | bool] = {}
        self._by_id: dict[str, int] = {}  # message id -> tag, unsettled only
        self._unsettled = 0
        self._bytes = 0
        self._lost: PublishFailed | None = None

    # -- state -------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return self._unsettled

    @property
    def in_flight_bytes(self) -> int:
        return self._bytes

    @property
    def full(self) -> bool:
        """No room: count at the limit, or bytes at the budget (an empty window always has room)."""
        return self._unsettled >= self.limit or (
            self._unsettled > 0 and self._bytes >= self.byte_limit
        )

    @property
    def empty(self) -> bool:
        return self._unsettled == 0

    @property
    def oldest_sent_at(self) -> float | None:
        """When the oldest unsettled publish was sent (the confirm timeout runs from it)."""
        return self._entries[0][4] if self._unsettled else None

    def has_unsettled(self, message_id: str) -> bool:
        return message_id in self._by_id

    def can_add(self, message_id: str) -> bool:
        """Room for one more publish with this id (not ``full``, id not unsettled): one call."""
        unsettled = self._unsettled
        return (
            unsettled < self.limit
            and (unsettled == 0 or self._bytes < self.byte_limit)
            and message_id not in self._by_id
        )

    # -- events ------------------------------------------------------------------

    def add(self, seq: int, message_id: str, exchange: str, size: int, now: float) -> int:
        """Record one publish; returns its delivery tag."""
        if self._lost is not None:
            raise self._lost
        by_id = self._by_id
        if message_id in by_id:
            raise ValueError(f"message {message_id!r} is already unsettled in this window")
        tag = self._next_tag
        self._next_tag = tag + 1
        self._entries.append((seq, message_id, exchange, size, now))
        by_id[message_id] = tag
        self._unsettled += 1
        self._bytes += size
        return tag

    def ack(self, tag: int, multiple: bool) -> Outcome:
        return self._settle(tag, multiple, None)

    def nack(self, tag: int, multiple: bool) -> Outcome:
        return self._settle(tag, multiple, PublishFailed("nacked by broker", code=reasons.NACK))

    def returned(self, message_id: str, error: PublishFailed) -> None:
        """Mark the unsettled publish with this id as returned; its ack will report it failed.

        Raises PublishFailed when no unsettled, not yet returned publish has the
        id: the caller must end the session (``fail_all``).
        """
        tag = self._by_id.get(message_id)
        if tag is None or tag in self._marks:
            raise PublishFailed(
                f"basic.return for message {message_id!r} matches no unsettled publish "
                f"({error.reason})",
                returned=True,
                reply_code=error.reply_code,
                code=reasons.PROTOCOL_ERROR,
            )
        self._marks[tag] = error

    def fail_all(self, error: PublishFailed) -> Outcome:
        """The channel or connection is gone: every unsettled publish is lost."""
        if self._lost is not None:
            return Outcome()
        if error.culprit_seq is None:
            error.culprit_seq = self._culprit(error)
        self._lost = error
        self._entries.clear()
        self._marks.clear()
        self._by_id.clear()
        self._first_tag = self._next_tag
        self._unsettled = 0
        self._bytes = 0
        return Outcome(lost=error)

    # -- internals ---------------------------------------------------------------

    def _culprit(self, error: PublishFailed) -> int | None:
        """The publish a channel close names: the oldest unsettled one it fits.

        The broker closes the channel at the first offending publish and
        processes nothing after it, so the oldest unsettled publish to the
        refused exchange (or over the size limit) is the one.
        """
        refused = error.refused_exchange
        limit = error.broker_max_message_size
        if refused is None and limit is None:
            return None
        for tag, (seq, _, exchange, size, _) in enumerate(self._entries, self._first_tag):
            if self._marks.get(tag) is _SETTLED:
                continue
            if exchange == refused or (limit is not None and size > limit):
                return seq
        return None

    def _settle(self, tag: int, multiple: bool, error: PublishFailed | None) -> Outcome:
        outcome = Outcome()
        first = self._first_tag
        if self._lost is not None or tag < first or tag >= self._next_tag:
            return outcome  # unknown, duplicate, or after the loss: nothing to settle
        entries = self._entries
        by_id = self._by_id
        marks = self._marks
        if multiple:
            confirmed = outcome.confirmed
            settled = released = 0
            for current in range(first, tag + 1):
                seq, message_id, _, size, _ = entries.popleft()
                state = marks.pop(current, _PENDING) if marks else _PENDING
                if state is _SETTLED:
                    continue
                del by_id[message_id]
                settled += 1
                released += size
                if state is _PENDING and error is None:
                    confirmed.append(seq)
                else:
                    outcome.failed.append((seq, state or error))  # type: ignore[arg-type]  # not a sentinel here
            self._first_tag = self._drop_settled_front(tag + 1)
            self._unsettled -= settled
            self._bytes -= released
            return outcome
        state = marks.get(tag, _PENDING)
        if state is _SETTLED:
            return outcome
        seq, message_id, _, size, _ = entries[tag - first]
        del by_id[message_id]
        self._unsettled -= 1
        self._bytes -= size
        if state is _PENDING and error is None:
            outcome.confirmed.append(seq)
        else:
            outcome.failed.append((seq, state or error))  # type: ignore[arg-type]  # not a sentinel here
        if tag == first:
            entries.popleft()
            marks.pop(tag, None)
            self._first_tag = self._drop_settled_front(tag + 1)
        else:
            marks[tag] = _SETTLED
        return outcome

    def _drop_settled_front(self, first: int) -> int:
        """Drop entries at the front settled out of order earlier; returns the new first tag.

        Whatever settles the front (a single ack of it, or a multiple ack ending just
        before an entry acked on its own) must leave an unsettled entry there:
        ``oldest_sent_at``, and so the confirm timeout, read the front.
        """
        entries = self._entries
        marks = self._marks
        while marks and entries and marks.get(first) is _SETTLED:
            entries.popleft()
            del marks[first]
            first += 1
        return first

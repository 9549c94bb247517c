"""The confirm window: which publishes are unsettled, and what each ack, nack or return means.

Pure bookkeeping, no asyncio and no sockets, so every rule is unit tested
without a broker. Delivery tags on a confirm channel are consecutive from 1,
so the tag of an entry is its position in the window plus the tag of the
oldest entry: parallel deques indexed by arithmetic replace a per-tag dict and
a per-message record object (the hot path, add + ``multiple`` ack, allocates
nothing per message beyond the deque slots).

Rules:
- A ``basic.return`` precedes the ack of the same publish and is matched by
  message id; the window holds at most one unsettled publish per id (the
  publisher waits on ``has_unsettled`` before reusing one), so the match is
  unambiguous. A return that matches nothing is a protocol failure: treating it
  as harmless would let the dropped message count as confirmed later.
- Each publish is reported once: confirmed, failed (nack or return), or lost
  with everything else when the connection or channel goes.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

# Markers in the per-entry state deque; a PublishFailed there means "returned".
_PENDING = None
_SETTLED = False


class PublishFailed(Exception):
    """The broker did not take a message: nack, return, or lost channel/connection.

    ``refused_exchange`` names the exchange of a channel close (404 missing,
    403 forbidden) and ``broker_max_message_size`` the limit of a 406 "message
    size" close; ``culprit_seq`` is then the publish that caused it, filled in
    by ``ConfirmWindow.fail_all``, so the caller can dead-letter that one row.
    """

    def __init__(
        self,
        reason: str,
        *,
        returned: bool = False,
        reply_code: int | None = None,
        refused_exchange: str | None = None,
        broker_max_message_size: int | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
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
        "_exchanges",
        "_first_tag",
        "_ids",
        "_lost",
        "_next_tag",
        "_sent_at",
        "_seqs",
        "_sizes",
        "_states",
        "_unsettled",
        "byte_limit",
        "limit",
    )

    def __init__(self, limit: int, byte_limit: int) -> None:
        if limit < 1 or byte_limit < 1:
            raise ValueError("the confirm window needs room for at least one message")
        self.limit = limit
        self.byte_limit = byte_limit
        self._first_tag = 1  # tag of index 0 of the deques
        self._next_tag = 1
        self._seqs: deque[int] = deque()
        self._ids: deque[str] = deque()
        self._exchanges: deque[str] = deque()
        self._sizes: deque[int] = deque()
        self._sent_at: deque[float] = deque()
        self._states: deque[PublishFailed | bool | None] = deque()
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
        return self._sent_at[0] if self._unsettled else None

    def has_unsettled(self, message_id: str) -> bool:
        return message_id in self._by_id

    # -- events ------------------------------------------------------------------

    def add(self, seq: int, message_id: str, exchange: str, size: int, now: float) -> int:
        """Record one publish; returns its delivery tag."""
        if self._lost is not None:
            raise self._lost
        if message_id in self._by_id:
            raise ValueError(f"message {message_id!r} is already unsettled in this window")
        tag = self._next_tag
        self._next_tag = tag + 1
        self._seqs.append(seq)
        self._ids.append(message_id)
        self._exchanges.append(exchange)
        self._sizes.append(size)
        self._sent_at.append(now)
        self._states.append(_PENDING)
        self._by_id[message_id] = tag
        self._unsettled += 1
        self._bytes += size
        return tag

    def ack(self, tag: int, multiple: bool) -> Outcome:
        return self._settle(tag, multiple, None)

    def nack(self, tag: int, multiple: bool) -> Outcome:
        return self._settle(tag, multiple, PublishFailed("nacked by broker"))

    def returned(self, message_id: str, error: PublishFailed) -> None:
        """Mark the unsettled publish with this id as returned; its ack will report it failed.

        Raises PublishFailed when no unsettled, not yet returned publish has the
        id: the caller must end the session (``fail_all``).
        """
        tag = self._by_id.get(message_id)
        if tag is None or self._states[tag - self._first_tag] is not _PENDING:
            raise PublishFailed(
                f"basic.return for message {message_id!r} matches no unsettled publish "
                f"({error.reason})",
                returned=True,
                reply_code=error.reply_code,
            )
        self._states[tag - self._first_tag] = error

    def fail_all(self, error: PublishFailed) -> Outcome:
        """The channel or connection is gone: every unsettled publish is lost."""
        if self._lost is not None:
            return Outcome()
        if error.culprit_seq is None:
            error.culprit_seq = self._culprit(error)
        self._lost = error
        for deq in (self._seqs, self._ids, self._exchanges, self._sizes, self._sent_at):
            deq.clear()
        self._states.clear()
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
        if error.refused_exchange is None and error.broker_max_message_size is None:
            return None
        for seq, exchange, size, state in zip(
            self._seqs, self._exchanges, self._sizes, self._states, strict=True
        ):
            if state is _SETTLED:
                continue
            if error.refused_exchange is not None and exchange == error.refused_exchange:
                return seq
            if error.broker_max_message_size is not None and size > error.broker_max_message_size:
                return seq
        return None

    def _settle(self, tag: int, multiple: bool, error: PublishFailed | None) -> Outcome:
        outcome = Outcome()
        if self._lost is not None or tag < self._first_tag or tag >= self._next_tag:
            return outcome  # unknown, duplicate, or after the loss: nothing to settle
        confirmed = outcome.confirmed
        seqs = self._seqs
        ids = self._ids
        sizes = self._sizes
        states = self._states
        by_id = self._by_id
        if multiple:
            count = tag - self._first_tag + 1
            exchanges = self._exchanges
            sent_at = self._sent_at
            settled = 0
            released = 0
            for _ in range(count):
                seq = seqs.popleft()
                message_id = ids.popleft()
                size = sizes.popleft()
                exchanges.popleft()
                sent_at.popleft()
                state = states.popleft()
                if state is _SETTLED:
                    continue
                del by_id[message_id]
                settled += 1
                released += size
                if state is _PENDING and error is None:
                    confirmed.append(seq)
                else:
                    outcome.failed.append((seq, state or error))  # type: ignore[arg-type]
            self._first_tag = tag + 1
            self._unsettled -= settled
            self._bytes -= released
        else:
            index = tag - self._first_tag
            state = states[index]
            if state is _SETTLED:
                return outcome
            states[index] = _SETTLED
            del by_id[ids[index]]
            self._unsettled -= 1
            self._bytes -= sizes[index]
            if state is _PENDING and error is None:
                confirmed.append(seqs[index])
            else:
                outcome.failed.append((seqs[index], state or error))  # type: ignore[arg-type]
            self._drop_settled_head()
        return outcome

    def _drop_settled_head(self) -> None:
        """Pop entries settled out of order once they reach the front."""
        states = self._states
        while states and states[0] is _SETTLED:
            states.popleft()
            self._seqs.popleft()
            self._ids.popleft()
            self._exchanges.popleft()
            self._sizes.popleft()
            self._sent_at.popleft()
            self._first_tag += 1

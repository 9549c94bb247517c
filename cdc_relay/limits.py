"""What the broker refused, and when to ask it again: the session's memory of refusals.

Pure, like ``core.py`` (which consults it for every routed row): no clock is
read and nothing awaits; the session (``session.py``) performs the trial
publish that ``BrokerLimits.recheck_due`` asks for and reports its answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

from cdc_relay.amqp.window import PublishFailed
from cdc_relay.envelope import Envelope
from cdc_relay.rows import OutboxRow

# A remembered refusal is asked again (a trial publish, session.py) at most this often
# before it dead-letters a row: a deleted exchange re-created, or a write permission
# restored after a credential rotation, is noticed within seconds.
RECHECK_INTERVAL: Final = 5.0


@dataclass(slots=True)
class BrokerLimits:
    """What the broker refused, until a re-check shows it takes such publishes again.

    A publish to a missing (404) or forbidden (403) exchange, or a body over the
    broker's ``max_message_size`` (406), closes the channel: the session ends
    and the same rows come again. Remembering the refusal turns the replayed
    row into a dead letter instead of an endless retry. But refusals heal (an
    exchange re-created, a permission restored, a limit raised), so before a
    remembered refusal dead-letters a row the relay asks the broker again, at
    most every ``RECHECK_INTERVAL`` seconds and at once on a new connection,
    and forgets the refusal when the broker takes the publish.

    The relay's own ``--exchange`` is never remembered: every row without an
    exchange of its own goes there, so its refusal is an outage (the session
    fails and retries), not a reason to dead-letter everything.

    Pure: the clock is passed in by the caller.
    """

    own_exchange: str | None = None
    refused_exchanges: dict[str, str] = field(default_factory=dict)
    max_message_size: int | None = None
    # When each refusal was last asked again (monotonic seconds); absent: due now.
    _checked: dict[str, float] = field(default_factory=dict)
    _size_checked: float | None = None

    @classmethod
    def empty(cls, own_exchange: str | None = None) -> BrokerLimits:
        return cls(own_exchange)

    def learn(self, error: PublishFailed) -> bool:
        """Record what a channel-closing refusal says; True if it named something to remember."""
        learned = False
        exchange = error.refused_exchange
        if exchange is not None and exchange != self.own_exchange:
            self.refused_exchanges[exchange] = error.reason
            learned = True
        if error.broker_max_message_size is not None:
            self.max_message_size = error.broker_max_message_size
            learned = True
        return learned

    def refuses(self) -> bool:
        """Anything remembered at all (the cheap test on the hot path)."""
        return bool(self.refused_exchanges) or self.max_message_size is not None

    def refusal(self, exchange: str, size: int) -> str | None:
        """Why a publish of ``size`` body bytes to ``exchange`` was refused before, if it was."""
        why = self.refused_exchanges.get(exchange)
        if why is not None:
            return f"exchange {exchange!r} refused by the broker: {why}"
        limit = self.max_message_size
        if limit is not None and size > limit:
            return (
                f"message body of {size} bytes exceeds the broker's max_message_size {limit} "
                "(it closed the channel on a larger one)"
            )
        return None

    def recheck_due(self, exchange: str, size: int, now: float) -> bool:
        """A refusal this publish meets was not asked again for ``RECHECK_INTERVAL`` seconds."""
        if exchange in self.refused_exchanges:
            checked = self._checked.get(exchange)
            if checked is None or now - checked >= RECHECK_INTERVAL:
                return True
        limit = self.max_message_size
        if limit is not None and size > limit:
            checked = self._size_checked
            return checked is None or now - checked >= RECHECK_INTERVAL
        return False

    def rechecked(self, exchange: str, size: int, error: PublishFailed | None, now: float) -> bool:
        """The broker's answer to a trial publish; True if a refusal was forgotten.

        ``error`` None: it took the publish, so neither the exchange nor the size
        refuses it any more. Otherwise what the refusal names is remembered again.
        """
        if error is None:
            forgot = self.refused_exchanges.pop(exchange, None) is not None
            self._checked.pop(exchange, None)
            if self.max_message_size is not None and size > self.max_message_size:
                self.max_message_size = self._size_checked = None
                forgot = True
            return forgot
        self.learn(error)
        for name in (exchange, error.refused_exchange):
            if name is not None and name in self.refused_exchanges:
                self._checked[name] = now
        if self.max_message_size is not None and size > self.max_message_size:
            self._size_checked = now
        return False

    def connected(self) -> None:
        """A new connection: every remembered refusal is due to be asked again.

        The broker announces none of these limits, so what an earlier connection
        learned is checked on this one before it dead-letters anything.
        """
        self._checked.clear()
        self._size_checked = None


@dataclass(slots=True)
class Recheck:
    """Answer: a remembered refusal would dead-letter this envelope; ask the broker first.

    The caller tries the publish (``BrokerLimits.recheck_due`` says whether it
    is time to), records the answer with ``BrokerLimits.rechecked`` and hands
    this back to ``SessionCore.rechecked``, which publishes or dead-letters.
    """

    seq: int
    envelope: Envelope
    values: tuple[Any, ...]
    row: OutboxRow


__all__ = ["RECHECK_INTERVAL", "BrokerLimits", "Recheck"]

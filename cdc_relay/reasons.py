"""The fixed reason codes of publish failures and dead letters: metric labels and log fields.

A reason's text names the row, the exchange or the broker's words and can be
anything; a Prometheus label must come from a small fixed set, or every new
text becomes a new series. So each failure and dead letter also carries one
code from these lists, chosen where the failure is made (``core``,
``amqp/window``, ``amqp/publisher``, ``amqp/connection``). Pure: no imports.
"""

from __future__ import annotations

from typing import Final

# -- why a publish failed (cdc_relay_publish_failures_total{reason}) -----------------

NACK: Final = "nack"  # the broker nacked it (a full bounded queue, an internal error)
UNROUTABLE: Final = "unroutable"  # returned: no queue bound for its routing key (mandatory)
TIMEOUT: Final = "timeout"  # no confirm within --confirm-timeout
CONNECTION_LOST: Final = "connection_lost"  # the connection went (network, heartbeats, close)
CHANNEL_CLOSED: Final = "channel_closed"  # the broker closed the channel or the connection
PROTOCOL_ERROR: Final = "protocol_error"  # a frame or a return the relay cannot match

PUBLISH_FAILURE_REASONS: Final = (
    NACK,
    UNROUTABLE,
    TIMEOUT,
    CONNECTION_LOST,
    CHANNEL_CLOSED,
    PROTOCOL_ERROR,
)

# -- why a row was dead-lettered (cdc_relay_messages_dead_lettered_total{reason}) ---------

# UNROUTABLE as above: returned by the broker under --on-unroutable deadletter
TOO_LARGE: Final = "too_large"  # over --max-message-size or the broker's max_message_size
BAD_ROW: Final = "bad_row"  # unreadable or unmappable (missing columns, bad headers, ...)
EXCHANGE_REFUSED: Final = "exchange_refused"  # not allowed, or the broker refused the exchange
NOT_OUTBOX: Final = "not_outbox"  # an insert into another table of the publication
UNAUTHENTICATED: Final = "unauthenticated"  # an emitted message the emit function did not sign
NON_TRANSACTIONAL: Final = "non_transactional"  # a logical message outside any transaction

DEAD_LETTER_REASONS: Final = (
    UNROUTABLE,
    TOO_LARGE,
    BAD_ROW,
    EXCHANGE_REFUSED,
    NOT_OUTBOX,
    UNAUTHENTICATED,
    NON_TRANSACTIONAL,
)

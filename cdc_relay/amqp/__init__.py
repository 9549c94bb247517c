"""Publishing to RabbitMQ: a pure confirm window, a thin connection, the publisher gluing them.

- ``window``: which publishes are unsettled and what each ack/nack/return settles (pure)
- ``connection``: one AMQP 0-9-1 connection attempt (framing, handshake, heartbeats)
- ``replies``: broker close frames to failures that name their culprit (pure)
- ``publisher``: the confirm-mode ``Publisher`` and ``declare_exchange``
- ``address``: AMQP URLs and their redaction
"""

from cdc_relay.amqp.address import AmqpAddress, redact
from cdc_relay.amqp.connection import ConnectError
from cdc_relay.amqp.publisher import (
    ExchangeError,
    Publisher,
    UnpublishableMessage,
    declare_exchange,
)
from cdc_relay.amqp.window import Outcome, PublishFailed

__all__ = [
    "AmqpAddress",
    "ConnectError",
    "ExchangeError",
    "Outcome",
    "PublishFailed",
    "Publisher",
    "UnpublishableMessage",
    "declare_exchange",
    "redact",
]

"""Publishing to RabbitMQ: a pure confirm window, a thin connection, the publisher gluing them.

- ``window``: which publishes are unsettled and what each ack/nack/return settles (pure)
- ``connection``: one AMQP 0-9-1 connection attempt (framing, handshake, heartbeats)
- ``replies``: broker close frames to failures that name their culprit (pure)
- ``publisher``: the confirm-mode ``Publisher`` and ``declare_exchange``
- ``address``: AMQP URLs and their redaction

The names below load their module on first use (PEP 562), so that importing a
pure submodule (``cdc_relay.amqp.window``, as the core does) loads no asyncio,
ssl or pamqp through this package face.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cdc_relay.amqp.address import AmqpAddress, redact
    from cdc_relay.amqp.connection import ConnectError
    from cdc_relay.amqp.publisher import (
        ExchangeError,
        Publisher,
        UnpublishableMessage,
        declare_exchange,
    )
    from cdc_relay.amqp.window import Outcome, PublishFailed

_HOMES = {
    "AmqpAddress": "address",
    "redact": "address",
    "ConnectError": "connection",
    "ExchangeError": "publisher",
    "Publisher": "publisher",
    "UnpublishableMessage": "publisher",
    "declare_exchange": "publisher",
    "Outcome": "window",
    "PublishFailed": "window",
}


def __getattr__(name: str) -> Any:
    """Load the submodule that defines ``name`` when it is first asked for."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value


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

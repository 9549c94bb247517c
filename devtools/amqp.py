"""Broker topology for tests, the benchmark and the demo, on aio-pika.

``declare_exchange`` is the one place outside the product that declares the
relay's exchange (a durable topic exchange, as ``cdc-relay init``/``run`` do);
once ``cdc_relay.amqp`` exposes its own ``declare_exchange`` this function
should simply call it, so that tests declare exactly what the relay declares.
"""

from __future__ import annotations

from typing import Any

import aio_pika

from cdc_relay.amqp import declare_exchange as product_declare_exchange

__all__ = ["declare_exchange", "delete_topology", "queue_depth", "topology"]


async def declare_exchange(amqp_url: str, name: str, kind: str = "topic") -> None:
    """Declare the relay's exchange: durable, ``kind`` (topic unless a test needs another).

    The product's one way to declare an exchange, so tests, bench and demo
    declare exactly what ``init`` and ``run`` do.
    """
    await product_declare_exchange([amqp_url], name, kind)


async def topology(
    amqp_url: str,
    exchange: str,
    queue: str,
    binding: str = "#",
    arguments: dict[str, Any] | None = None,
) -> None:
    """The relay's exchange plus a durable queue bound to it (``#``: every message)."""
    await declare_exchange(amqp_url, exchange)
    connection = await aio_pika.connect(amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, durable=True, arguments=arguments)
        await declared.bind(exchange, binding)


async def queue_depth(amqp_url: str, queue: str) -> int:
    """Messages ready in an existing queue (a passive declare)."""
    connection = await aio_pika.connect(amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return int(declared.declaration_result.message_count or 0)


async def delete_topology(amqp_url: str, queue: str | None, exchange: str | None = None) -> None:
    """Delete a queue and/or an exchange (absent ones are fine)."""
    connection = await aio_pika.connect(amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        if queue is not None:
            await channel.queue_delete(queue)
        if exchange is not None:
            await channel.exchange_delete(exchange)

"""The broker ceiling: how fast RabbitMQ confirms the relay's messages, with no relay."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime

from pamqp import commands as spec

from bench.loadproc import PAD
from bench.rawamqp import RawAmqp, publish_frames


def sample_message() -> tuple[bytes, spec.Basic.Properties]:
    """A body and properties shaped like cdc-relay's (same sizes, same header table)."""
    body = ('{"pad": "' + PAD + '", "order_id": 1000001}').encode()
    properties = spec.Basic.Properties(
        content_type="application/json",
        delivery_mode=2,
        message_id=str(uuid.uuid4()),
        timestamp=datetime.now(UTC).replace(microsecond=0),
        message_type="OrderCreated",
        app_id="cdc-relay",
        headers={"aggregate_type": "order", "aggregate_id": "1", "event_type": "OrderCreated"},
    )
    return body, properties


async def broker_ceiling(amqp_url: str, kind: str, count: int, window: int) -> dict[str, float]:
    """Pre-marshalled persistent publishes through a topic exchange ('#') into one queue.

    The same route as the relay's (topic exchange, one durable queue bound with
    '#'), on a confirm channel; frames are written in bulk from the ack
    callback, keeping ``window`` unconfirmed; acks are counted with
    ``multiple`` ones expanded. Seconds run from the first write to the last ack.
    """
    tag = uuid.uuid4().hex[:6]
    exchange, queue = f"bench_ceiling_{tag}", f"q_ceiling_{kind}_{tag}"
    client = await RawAmqp.connect(amqp_url)
    try:
        await client.declare_exchange(exchange)
        await client.declare_queue(queue, {"x-queue-type": kind})
        await client.bind(queue, exchange)
        body, properties = sample_message()
        frames = publish_frames(exchange, "order.OrderCreated", body, properties)
        cpu = time.process_time()
        seconds = await client.publish_bulk(frames, count, window, timeout=max(120, count / 500))
        cpu = time.process_time() - cpu
        queued = await client.declare_queue(queue, passive=True)
        await client.delete_queue(queue)
        await client.delete_exchange(exchange)
    finally:
        await client.close()
    if queued != count:
        raise RuntimeError(f"{count} confirmed but {queued} in the queue")
    return {
        "messages": count,
        "seconds": seconds,
        "msgs_per_s": count / seconds,
        "window": window,
        "client_cpu_us_per_msg": cpu / count * 1e6,
        "frame_bytes": len(frames),
    }

"""The broker ceiling: how fast RabbitMQ confirms the relay's messages, with no relay."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime

from pamqp import commands as spec

from bench.loadproc import PAD
from bench.rawamqp import RawAmqp, publish_frames
from devtools.amqp import delete_topology, queue_depth, topology


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
    await topology(amqp_url, exchange, queue, arguments={"x-queue-type": kind})
    client = await RawAmqp.connect(amqp_url)
    try:
        body, properties = sample_message()
        frames = publish_frames(exchange, "order.OrderCreated", body, properties)
        cpu = time.process_time()
        seconds = await client.publish_bulk(frames, count, window, timeout=max(120, count / 500))
        cpu = time.process_time() - cpu
    finally:
        await client.close()
    queued = await queue_depth(amqp_url, queue)
    await delete_topology(amqp_url, queue, exchange)
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

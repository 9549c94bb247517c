"""The broker ceiling: how fast RabbitMQ confirms the relay's messages, with no relay."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pamqp import commands as spec

from bench.env import Phase, cdf_points, percentiles
from bench.loadproc import PAD
from bench.rawamqp import RawAmqp, publish_frames
from bench.relayrun import Consumer, message_shape
from cdc_relay.envelope import Envelope
from devtools.amqp import delete_topology, queue_depth, topology

ROUTING_KEY = "order.OrderCreated"  # the relay's default template for the backlog's rows


def sample_message() -> tuple[bytes, spec.Basic.Properties]:
    """A body and properties as cdc-relay publishes a backlog row.

    The constant properties come from the relay's own ``Envelope`` defaults, so a
    change there changes the ceiling too; the drain checks the rest against a
    message the relay really published (``relayrun.describe_one_message``).
    """
    defaults = Envelope(exchange="", routing_key="", body=b"", message_id="", type=None, headers={})
    body = ('{"pad": "' + PAD + '", "order_id": 1000001}').encode()
    properties = spec.Basic.Properties(
        content_type=defaults.content_type,
        delivery_mode=defaults.delivery_mode,
        message_id=str(uuid.uuid4()),
        timestamp=datetime.now(UTC).replace(microsecond=0),
        message_type="OrderCreated",
        app_id=defaults.app_id,
        headers={"aggregate_type": "order", "aggregate_id": "1", "event_type": "OrderCreated"},
    )
    return body, properties


def properties_dict(properties: spec.Basic.Properties) -> dict[str, Any]:
    """pamqp properties under the names aio-pika gives a received message's."""
    names = [
        "content_type",
        "content_encoding",
        "headers",
        "delivery_mode",
        "priority",
        "correlation_id",
        "reply_to",
        "expiration",
        "message_id",
        "timestamp",
        "user_id",
        "app_id",
    ]
    out = {name: getattr(properties, name) for name in names}
    out["type"] = properties.message_type
    return out


def ceiling_shape() -> dict[str, Any]:
    """The ceiling's message described as ``relayrun.message_shape`` describes the relay's."""
    body, properties = sample_message()
    return message_shape("bench_ceiling", ROUTING_KEY, len(body), properties_dict(properties))


def ceiling_frames(exchange: str) -> bytes:
    """One message's frames as the relay writes them: mandatory, its route and properties."""
    body, properties = sample_message()
    return publish_frames(exchange, ROUTING_KEY, body, properties, mandatory=True)


async def broker_ceiling(amqp_url: str, kind: str, count: int, window: int) -> dict[str, Any]:
    """Pre-marshalled persistent publishes through a topic exchange ('#') into one queue.

    Like for like with the relay: its exchange declared the way the relay
    declares it, one durable queue bound with '#', ``mandatory`` publishes with
    its properties and headers, on a confirm channel; frames are written in bulk
    from the ack callback, keeping ``window`` unconfirmed; acks are counted with
    ``multiple`` ones expanded. Seconds run from the first write to the last ack.
    """
    tag = uuid.uuid4().hex[:6]
    exchange, queue = f"bench_ceiling_{tag}", f"q_ceiling_{kind}_{tag}"
    await topology(amqp_url, exchange, queue, arguments={"x-queue-type": kind})
    client = await RawAmqp.connect(amqp_url)
    try:
        frames = ceiling_frames(exchange)
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


async def raw_publisher_latency(
    amqp_url: str, rate: int, seconds: float, workdir: Path, phase: Phase
) -> dict[str, Any]:
    """The raw publisher's own publish->confirm at ``rate`` msg/s, paced, with a consumer.

    The same frames as the ceiling (the relay's message), the same topology and
    the same consuming process as the relay's latency step, so the two tails
    can be read side by side: what the broker adds at this rate with no relay.
    """
    tag = uuid.uuid4().hex[:6]
    exchange, queue = f"bench_ceiling_paced_{tag}", f"q_paced_{tag}"
    await topology(amqp_url, exchange, queue)
    consumer = Consumer(amqp_url, queue, workdir / f"paced_{tag}.recv", seconds + 120)
    client = await RawAmqp.connect(amqp_url)
    try:
        await consumer.ready()
        phase.note(f"publishing at {rate:,}/s", 0)
        cpu = time.process_time()
        started = time.monotonic()
        latencies = await client.publish_paced(ceiling_frames(exchange), rate, seconds)
        elapsed = time.monotonic() - started
        cpu = time.process_time() - cpu
        await consumer.wait_for(len(latencies), 60, phase)
        phase.measure_cpu()
        await consumer.stop()
    finally:
        await client.close()
        consumer.kill()
        consumer.out.unlink(missing_ok=True)
    await delete_topology(amqp_url, queue, exchange)
    result: dict[str, Any] = dict(percentiles(latencies))
    result["cdf"] = cdf_points(latencies)
    result["target_rate"] = rate
    result["achieved_rate"] = len(latencies) / elapsed
    result["client_cores"] = cpu / elapsed
    return result

"""Load-generator processes for latency runs: a paced writer and a timing consumer.

They run as separate OS processes so their Python work never delays each
other (or the relay) through one GIL: `python -m bench.loadproc writer|consumer`.
Each writes "message_id unix_time" lines to its --out file.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import aio_pika
import psycopg

PAD = "x" * 260


def writer(dsn: str, table: str, rate: float, seconds: float, out: Path) -> None:
    statement = (
        f"INSERT INTO {table} (aggregate_type, aggregate_id, event_type, payload)"
        " VALUES ('order', '1', 'OrderCreated', jsonb_build_object('pad', %s::text))"
        " RETURNING id::text"
    )
    lines: list[str] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        started = time.monotonic()
        n = 0
        while time.monotonic() - started < seconds:
            due = started + n / rate
            now = time.monotonic()
            if due > now:
                time.sleep(due - now)
            row = conn.execute(statement, (PAD,)).fetchone()
            assert row is not None
            lines.append(f"{row[0]} {time.time()}")
            n += 1
    out.write_text("\n".join(lines) + "\n")


async def consumer(url: str, queue: str, seconds: float, out: Path) -> None:
    received: list[str] = []
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=2000)
        q = await channel.get_queue(queue)

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            received.append(f"{message.message_id} {time.time()}")
            await message.ack()

        await q.consume(on_message)
        Path(str(out) + ".ready").write_text("ready")
        await asyncio.sleep(seconds)
    out.write_text("\n".join(received) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["writer", "consumer"])
    parser.add_argument("--dsn", default="")
    parser.add_argument("--table", default="")
    parser.add_argument("--url", default="")
    parser.add_argument("--queue", default="")
    parser.add_argument("--rate", type=float, default=1000)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--out", type=Path, required=True)
    a = parser.parse_args()
    if a.role == "writer":
        writer(a.dsn, a.table, a.rate, a.seconds, a.out)
    else:
        asyncio.run(consumer(a.url, a.queue, a.seconds, a.out))


if __name__ == "__main__":
    main()

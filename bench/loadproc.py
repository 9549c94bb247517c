"""Load processes for the latency runs: a paced writer and a timing consumer.

Each runs as its own OS process (``python -m bench.loadproc writer|consumer``)
so its Python work never delays the relay or the other one through a shared GIL.

writer: single-row INSERT transactions (autocommit) at a fixed total rate over
a few asyncpg connections, each paced on its own schedule. After each COMMIT
returns it records ``id unix_time``. It never sends more than ``rate *
seconds`` rows and stops at ``seconds``; a connection that falls behind its
schedule sends at once (how late it was is reported, as ``late_*``).

consumer: a no-ack consumer on the raw AMQP client (aio-pika consumed 4,100-5,200
msg/s here, under the 5,000 rows/s step; see bench/rawamqp.py); records
``message_id unix_time`` when the frame arrives. It prints ``ready`` once consuming, answers
``count`` on stdin with the number received, and on ``stop`` (or stdin EOF, or
``--max-seconds``) writes its file and prints ``done N``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import threading
import time
from pathlib import Path

from bench.rawamqp import RawAmqp

PAD = "x" * 268  # {"pad": "...", "order_id": 1234567} is then 300 bytes of jsonb text


def insert_sql(table: str) -> str:
    """The single-row outbox insert both the writer and the backlog use (300-byte payload)."""
    return (
        f"INSERT INTO {table} (aggregate_type, aggregate_id, event_type, payload)"
        " VALUES ('order', $1::text, 'OrderCreated',"
        " jsonb_build_object('order_id', 1000000 + $1::int, 'pad', $2::text))"
        " RETURNING id::text"
    )


async def writer(
    dsn: str, table: str, rate: float, seconds: float, connections: int, out: Path
) -> dict[str, float]:
    import asyncpg

    statement = insert_sql(table)
    conns = [await asyncpg.connect(dsn) for _ in range(connections)]
    lines: list[str] = []
    late: list[float] = []
    per_conn = rate / connections
    total = int(rate * seconds)
    started = time.monotonic() + 0.05

    async def run(index: int, conn: asyncpg.Connection) -> None:
        n = 0
        offset = index / rate  # interleave the connections' schedules
        while True:
            seq = n * connections + index
            if seq >= total:
                return
            due = started + offset + n / per_conn
            now = time.monotonic()
            if now - started >= seconds:
                return
            if due > now:
                await asyncio.sleep(due - now)
            else:
                late.append(now - due)
            row_id = await conn.fetchval(statement, str(seq), PAD)
            lines.append(f"{row_id} {time.time()}")
            n += 1

    await asyncio.gather(*(run(i, c) for i, c in enumerate(conns)))
    elapsed = time.monotonic() - started
    for conn in conns:
        await conn.close()
    out.write_text("\n".join(lines) + "\n")
    late.sort()
    return {
        "n": len(lines),
        "seconds": elapsed,
        "late_count": len(late),
        "late_p99_ms": late[int(len(late) * 0.99)] * 1e3 if late else 0.0,
        "late_max_ms": late[-1] * 1e3 if late else 0.0,
    }


async def consumer(url: str, queue: str, max_seconds: float, out: Path) -> int:
    received: list[tuple[str, float]] = []
    client = await RawAmqp.connect(url)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def commands() -> None:
        for line in sys.stdin:
            if line.strip() == "count":
                print(len(received), flush=True)
            elif line.strip() == "stop":
                break
        loop.call_soon_threadsafe(stop.set)

    await client.consume_no_ack(queue, lambda mid, t: received.append((mid, t)))
    print("ready", flush=True)
    threading.Thread(target=commands, daemon=True).start()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), max_seconds)
    await client.close()
    out.write_text("".join(f"{mid} {t}\n" for mid, t in received))
    return len(received)


def read_times(path: Path) -> dict[str, float]:
    """``id unix_time`` lines -> {id: time} (the first time an id was seen)."""
    times: dict[str, float] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if value and key not in times:
                times[key] = float(value)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["writer", "consumer"])
    parser.add_argument("--dsn", default="")
    parser.add_argument("--table", default="")
    parser.add_argument("--rate", type=float, default=1000)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--url", default="")
    parser.add_argument("--queue", default="")
    parser.add_argument("--max-seconds", type=float, default=300)
    parser.add_argument("--out", type=Path, required=True)
    a = parser.parse_args()
    if a.role == "writer":
        result = asyncio.run(writer(a.dsn, a.table, a.rate, a.seconds, a.connections, a.out))
        print(json.dumps(result), flush=True)
    else:
        n = asyncio.run(consumer(a.url, a.queue, a.max_seconds, a.out))
        print(f"done {n}", flush=True)


if __name__ == "__main__":
    main()

"""CPU per row of the relay's hot path, without servers: ``python -m devtools.profile_drain``.

Drives the session's real pump (``Session._pump``), ``SessionCore``, router,
``Publisher`` and ``Connection`` (incoming frames parsed as from a socket), and
the dead-letter sink, over synthetic replication frames built with the test
suite's independent pgoutput encoder. Only the sockets are missing: the
stream hands out pre-built batches of frames (as ``read_frames`` would), the
AMQP transport swallows what is written, and the broker's answers (a
``multiple`` ack per batch; on the dead-letter path, a ``basic.return`` of
every message before it) are pre-built bytes fed to ``data_received``. The
dead-letter writer builds the binary COPY data and sends it nowhere.

CPU is ``time.process_time`` over the drain alone (frames and replies are
built before the clock starts), so numbers compare across commits on a
shared machine better than wall time; the median of ``--repeat`` runs is
printed with the minimum (the run least disturbed by other processes).
``--profile N`` prints cProfile's top N (``--sort``) instead.
Bounded: ``--rows`` is capped, and every run ends when its frames are used up.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import pstats
import statistics
import sys
import time
import uuid
from dataclasses import dataclass

from pamqp import commands as spec
from pamqp import frame as pamqp_frame

from cdc_relay import logs
from cdc_relay.amqp.connection import Connection
from cdc_relay.amqp.publisher import Publisher
from cdc_relay.amqp_wire import PublishEncoder
from cdc_relay.config import Settings
from cdc_relay.core import SessionCore
from cdc_relay.deadletters import DeadLetterSink, copy_tuple
from cdc_relay.letters import DeadLetter
from cdc_relay.limits import BrokerLimits
from cdc_relay.metrics import Metrics
from cdc_relay.pg.pgoutput import Begin, Column, Commit, Insert, Relation
from cdc_relay.pg.replication import MAX_FRAMES_PER_BATCH
from cdc_relay.router import Router
from cdc_relay.rows import OUTBOX_COLUMNS, RowReader
from cdc_relay.session import Session
from tests.pgoutput_encoder import encode

MAX_ROWS = 1_000_000
OUTBOX_RELID = 16391
CHANNEL = 1
START_LSN = 0x1000000
PG_TS = 849_000_000_000_000  # µs since 2000-01-01 (a day in 2026)


class DrainDone(Exception):
    """The stream's frames are used up: the drain is over."""


def xlog(payload: bytes, lsn: int) -> bytes:
    return b"w" + lsn.to_bytes(8, "big") * 2 + (0).to_bytes(8, "big") + payload


def row_values(n: int, payload_bytes: int) -> tuple[bytes | None, ...]:
    """One outbox row as the bench writes it: a ~300-byte jsonb payload, default headers."""
    pad = "x" * max(0, payload_bytes - 40)
    values = {
        "id": str(uuid.UUID(int=n)).encode(),
        "aggregate_type": b"order",
        "aggregate_id": str(n).encode(),
        "event_type": b"OrderCreated",
        "payload": b'{"pad": "%s", "order_id": %d}' % (pad.encode(), 1_000_000 + n),
        "headers": b"{}",
        "exchange": None,
        "routing_key": None,
        "created_at": b"2026-12-03 19:08:17.123456+00",
    }
    return tuple(values[c] for c in OUTBOX_COLUMNS)


@dataclass(slots=True)
class Workload:
    """Frames in read_frames batches, the broker's answer after each, what the drain must reach."""

    batches: list[list[bytes]]
    replies: list[bytes]
    rows: int
    end_lsn: int


def workload(rows: int, txn: int, payload_bytes: int, returned: bool) -> Workload:
    """``rows`` rows in ``txn``-row transactions, cut into batches of at most 512 frames."""
    columns = tuple(Column(1 if c == "id" else 0, c, 25, -1) for c in OUTBOX_COLUMNS)
    lsn = START_LSN
    frames = [xlog(encode(Relation(OUTBOX_RELID, "public", "outbox", "d", columns)), lsn)]
    values: list[tuple[bytes | None, ...]] = []
    end_lsn = lsn
    for first in range(1, rows + 1, txn):
        last = min(first + txn - 1, rows)
        lsn += 400 * (last - first + 1) + 100
        frames.append(xlog(encode(Begin(lsn, PG_TS, first)), lsn))
        for n in range(first, last + 1):
            values.append(row_values(n, payload_bytes))
            frames.append(xlog(encode(Insert(OUTBOX_RELID, values[-1])), lsn))
        end_lsn = lsn + 60
        frames.append(xlog(encode(Commit(0, lsn, end_lsn, PG_TS)), end_lsn))
    batches = [
        frames[i : i + MAX_FRAMES_PER_BATCH] for i in range(0, len(frames), MAX_FRAMES_PER_BATCH)
    ]
    # The broker's answer to each batch: (returns of its messages,) one multiple ack.
    reader = RowReader(list(OUTBOX_COLUMNS))
    router = Router()
    encoder = PublishEncoder(CHANNEL, 131072)
    replies: list[bytes] = []
    published = 0
    for batch in batches:
        count = sum(1 for f in batch if f[25] == 0x49)  # 'I'
        parts: list[bytes] = []
        if returned:
            for row in values[published : published + count]:
                envelope = router.route(reader.read(row))
                data = encoder.encode(envelope)
                method_end = int.from_bytes(data[3:7], "big") + 8
                parts.append(
                    pamqp_frame.marshal(
                        spec.Basic.Return(312, "NO_ROUTE", envelope.exchange, envelope.routing_key),
                        CHANNEL,
                    )
                    + data[method_end:]  # the content header and body, as published
                )
        published += count
        if count:
            parts.append(pamqp_frame.marshal(spec.Basic.Ack(published, multiple=True), CHANNEL))
        replies.append(b"".join(parts))
    return Workload(batches, replies, rows, end_lsn)


class _Transport:
    """Where the AMQP connection writes: counted, dropped."""

    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def is_closing(self) -> bool:
        return False

    def abort(self) -> None:
        pass


class _Stream:
    """read_frames from the workload; before each batch, the broker answers the last one."""

    def __init__(self, work: Workload, connection: Connection) -> None:
        self._batches = iter(work.batches)
        self._replies = iter(work.replies)
        self._connection = connection
        self._first = True

    async def read_frames(self) -> list[bytes]:
        await asyncio.sleep(0)  # the publisher's call_soon flush
        if not self._first:
            self._connection.data_received(next(self._replies))
        self._first = False
        batch = next(self._batches, None)
        if batch is None:
            for _ in range(3):  # the sink stores the last dead letters
                await asyncio.sleep(0)
            raise DrainDone
        return batch


class _Writer:
    """The dead-letter writer's CPU without its connection: the binary COPY data, built."""

    def __init__(self) -> None:
        self.stored = 0

    async def write(self, items: list[DeadLetter]) -> None:
        b"".join([copy_tuple(letter) for letter in items])
        self.stored += len(items)


async def drain(work: Workload, profiler: cProfile.Profile | None) -> float:
    """One drain through the real pump; returns its CPU seconds."""
    settings = Settings()
    metrics = Metrics()
    router = Router.from_settings(settings)
    stop, abort = asyncio.Event(), asyncio.Event()
    session = Session(settings, metrics, router, BrokerLimits.empty(), stop, abort)
    core = SessionCore(
        outbox_relid=OUTBOX_RELID,
        table=settings.table,
        router=router,
        start_flush=0,
        max_message_size=settings.max_message_size,
        dead_letter_unroutable=True,
        limits=session.limits,
        counters=metrics,
        observe_commit_to_confirm=metrics.commit_to_confirm.observe,
    )
    publisher = Publisher(
        ["amqp://localhost"], max_in_flight=settings.max_in_flight, on_outcome=session._on_outcome
    )
    connection = Connection(publisher.frame_received, None, heartbeat=0)
    connection.connection_made(_Transport())  # type: ignore[arg-type]
    connection.opened = True
    publisher._adopt(connection)
    writer = _Writer()
    session.core = core
    session.sink = sink = DeadLetterSink(writer, session._stored)  # type: ignore[arg-type]
    sink_task = asyncio.create_task(sink.run())
    stream = _Stream(work, connection)
    await asyncio.sleep(0)
    started = time.process_time()
    if profiler is not None:
        profiler.enable()
    with contextlib.suppress(DrainDone):
        await session._pump(stream, publisher, core)  # type: ignore[arg-type]
    if profiler is not None:
        profiler.disable()
    cpu = time.process_time() - started
    sink_task.cancel()
    await publisher.close()
    if core.flush_lsn != work.end_lsn:
        raise AssertionError(f"drain ended at {core.flush_lsn:#x}, not {work.end_lsn:#x}")
    if core.unconfirmed:
        raise AssertionError(f"{core.unconfirmed} rows unconfirmed after the drain")
    return cpu


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=30_000)
    parser.add_argument("--txn", type=int, default=1, help="rows per transaction")
    parser.add_argument("--payload", type=int, default=300, help="payload bytes")
    parser.add_argument("--path", choices=("happy", "deadletter"), default="happy")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="cProfile top N")
    parser.add_argument("--sort", default="tottime", help="cProfile sort key")
    parser.add_argument("--log-level", default="WARNING", help="the relay's (default WARNING)")
    args = parser.parse_args(argv)
    rows = max(1, min(args.rows, MAX_ROWS))
    # The relay's own logging (text), written nowhere: each dead letter logs a warning.
    logs.setup(args.log_level, "text", lambda s: s)
    sys.stderr = io.StringIO() if args.path == "deadletter" else sys.stderr
    work = workload(rows, max(1, args.txn), args.payload, args.path == "deadletter")
    profiler = cProfile.Profile() if args.profile else None
    runs = []
    for _ in range(1 if profiler else max(1, min(args.repeat, 50))):
        runs.append(asyncio.run(drain(work, profiler)) / rows * 1e6)
        if isinstance(sys.stderr, io.StringIO):
            sys.stderr = io.StringIO()
    sys.stderr = sys.__stderr__
    what = f"{args.path} path, {rows} rows, {args.txn}-row transactions"
    print(
        f"{what}: median {statistics.median(runs):.1f}, min {min(runs):.1f} µs CPU/row"
        f" (runs: {[round(r, 1) for r in runs]})"
    )
    if profiler is not None:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats(args.sort).print_stats(args.profile)
        print(out.getvalue())


if __name__ == "__main__":
    main()

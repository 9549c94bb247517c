"""CPU per row of the hot path, pure Python against compiled, without servers (issue 20).

    python -m devtools.accel_bench [--rows 20000] [--repeat 3] [--rounds 3]
                                   [--txn-rows 1,100] [--subsets]

Synthetic pgoutput frames (300-byte payloads, the outbox's nine columns) go
through what the session does per row: ``SessionCore.receive``, the AMQP
``PublishEncoder``, the ``ConfirmWindow``, and one broker ack per transaction
settled by ``SessionCore.settle``, which moves the flush position. Each
configuration runs in its own interpreter (the implementation is chosen once per
process); the figures are the minimum and the median, over ``--rounds`` interpreters
of ``--repeat`` runs each (configurations interleaved), of process CPU time
divided by the rows: on a shared machine the minimum is the steadiest.
``--subsets`` also times each module compiled alone, which says which of
them buy something. ``--instructions`` counts instructions per
row under valgrind instead (at most 5,000 rows; slow, but what a busy
neighbour cannot change).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUTBOX_RELID = 16391
VALGRIND = ("valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null")
MAX_ROWS = 1_000_000  # bounds the run, whatever is asked


def frames(rows: int, txn_rows: int) -> list[bytes]:
    """The walsender's frames for ``rows`` inserts in transactions of ``txn_rows``."""
    from cdc_relay.pg.pgoutput import Begin, Column, Commit, Insert, Relation
    from cdc_relay.rows import OUTBOX_COLUMNS
    from tests.pgoutput_encoder import encode

    def xlog(message: Any, lsn: int) -> bytes:
        lsn_bytes = lsn.to_bytes(8, "big")
        return b"w" + lsn_bytes + lsn_bytes + bytes(8) + encode(message)

    columns = tuple(Column(int(c == "id"), c, 25, -1) for c in OUTBOX_COLUMNS)
    out = [xlog(Relation(OUTBOX_RELID, "public", "outbox", "d", columns), 0x1000)]
    lsn = 0x2000
    payload = b'{"order": %d, "pad": "' + b"x" * 270 + b'"}'
    n = 0
    while n < rows:
        size = min(txn_rows, rows - n)
        out.append(xlog(Begin(lsn + 0x100 * size, 848717704572437, 700 + n), lsn))
        for _ in range(size):
            n += 1
            lsn += 0x100
            values = (
                f"00000000-0000-0000-0000-{n:012d}".encode(),
                b"order",
                str(n).encode(),
                b"OrderCreated",
                payload % n,
                b'{"trace": "abc"}',
                None,
                None,
                b"2026-11-23 10:11:12.123456+00",
            )
            out.append(xlog(Insert(OUTBOX_RELID, values), lsn))
        lsn += 0x100
        out.append(xlog(Commit(0, lsn, lsn + 0x30, 848717704572437), lsn + 0x30))
        lsn += 0x100
    return out


def drain(stream: list[bytes]) -> tuple[int, int]:
    """What a session does with ``stream``; returns (rows published, final flush LSN)."""
    from cdc_relay.amqp.window import ConfirmWindow
    from cdc_relay.amqp_wire import PublishEncoder
    from cdc_relay.core import SessionCore
    from cdc_relay.envelope import Envelope
    from cdc_relay.router import Router

    core = SessionCore(
        outbox_relid=OUTBOX_RELID,
        table="public.outbox",
        router=Router(),
        start_flush=0,
        max_message_size=1 << 20,
    )
    window = ConfirmWindow(1 << 30, 1 << 50)
    encoder = PublishEncoder(1, 131072)
    written: list[bytes] = []
    published = 0
    tag = 0
    for frame in stream:
        action = core.receive(frame)
        if type(action) is Envelope:
            data = encoder.encode(action)
            tag = window.add(core.last_seq, action.message_id, action.exchange, len(data), 0.0)
            written.append(data)
            published += 1
        elif action is None and frame[25:26] == b"C" and tag:  # a Commit: the broker acks
            core.settle(window.ack(tag, True), 0.0)
            written.clear()  # one write per transaction
    return published, core.flush_lsn


def child(rows: int, txn_rows: int, repeat: int, modules: list[str]) -> dict[str, Any]:
    """One configuration, timed in this process: ``modules`` compiled, the rest pure."""
    from cdc_relay import accel

    full = accel.decide(os.environ)
    missing = [m for m in modules if m not in full.extensions]
    if missing:
        raise SystemExit(f"not compiled here ({full.reason}): {', '.join(missing)}")
    # A subset is a benchmark's choice only: the relay itself runs all or nothing.
    accel._choice = accel.Choice(
        accel.COMPILED_NAME if modules else accel.PURE_NAME,
        "benchmark subset",
        {m: full.extensions[m] for m in modules},
    )
    stream = frames(rows, txn_rows)
    drain(stream[: 2 + 3 * 100])  # warm up caches and the window
    runs = []
    for _ in range(repeat):
        start = time.process_time()
        published, flush = drain(stream)
        runs.append((time.process_time() - start) / published * 1e6)
        assert published == rows and flush > 0, (published, flush)
    import cdc_relay.core

    return {"us_per_row": statistics.median(runs), "runs": runs, "core": cdc_relay.core.__file__}


def measure(rows: int, txn_rows: int, repeat: int, modules: list[str]) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "CDC_RELAY_PURE_PYTHON"}
    args = ["--child", "--rows", str(rows), "--txn-rows", str(txn_rows)]
    args += ["--repeat", str(repeat), "--modules", ",".join(modules)]
    done = subprocess.run(
        [sys.executable, "-m", "devtools.accel_bench", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0:
        raise SystemExit(done.stderr.strip().splitlines()[-1] if done.stderr else "child failed")
    return dict(json.loads(done.stdout))


def instructions(rows: int, txn_rows: int, modules: list[str]) -> float:
    """Instructions per row under valgrind: unlike CPU time, no neighbour changes it.

    The difference between three drains and one in the same interpreter, so that
    start-up, building the frames and the warm-up cancel out.
    """
    counts = []
    for repeat in (1, 3):
        args = ["--child", "--rows", str(rows), "--txn-rows", str(txn_rows)]
        args += ["--repeat", str(repeat), "--modules", ",".join(modules)]
        done = subprocess.run(
            [*VALGRIND, sys.executable, "-m", "devtools.accel_bench", *args],
            cwd=ROOT,
            env={k: v for k, v in os.environ.items() if k != "CDC_RELAY_PURE_PYTHON"},
            capture_output=True,
            text=True,
            timeout=900,
        )
        found = re.search(r"Collected : (\d+)", done.stderr)
        if done.returncode != 0 or found is None:
            raise SystemExit(f"valgrind failed: {done.stderr.strip()[-500:]}")
        counts.append(int(found[1]))
    return (counts[1] - counts[0]) / (2 * rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3, help="runs per interpreter")
    parser.add_argument("--rounds", type=int, default=3, help="interpreters per configuration")
    parser.add_argument("--txn-rows", default="1,100", help="rows per transaction, a list")
    parser.add_argument("--subsets", action="store_true", help="also each module alone")
    parser.add_argument(
        "--instructions", action="store_true", help="count instructions under valgrind instead"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--modules", default="", help=argparse.SUPPRESS)
    options = parser.parse_args()
    rows = max(1, min(options.rows, MAX_ROWS))
    repeat = max(1, min(options.repeat, 50))
    if options.child:
        modules = [m for m in options.modules.split(",") if m]
        print(json.dumps(child(rows, int(options.txn_rows), repeat, modules)))
        return
    from cdc_relay.accel import COMPILED

    configs: list[tuple[str, list[str]]] = [("pure-python", []), ("compiled", list(COMPILED))]
    if options.subsets:
        configs += [(f"only {m}", [m]) for m in COMPILED]
    sizes = [int(s) for s in options.txn_rows.split(",")]
    if options.instructions:
        rows = min(rows, 5000)  # valgrind runs some 50 times slower
        print(f"{rows} rows under valgrind: instructions per row")
        print(f"{'configuration':34}" + "".join(f"{f'{s}-row txns':>20}" for s in sizes))
        base: dict[int, float] = {}
        for name, modules in configs:
            cells = []
            for size in sizes:
                count = instructions(rows, size, modules)
                base.setdefault(size, count)
                cells.append(f"{count:10,.0f} {base[size] / count:4.2f}x")
            print(f"{name:34}" + "".join(f"{c:>20}" for c in cells), flush=True)
        return
    rounds = max(1, min(options.rounds, 20))
    runs: dict[tuple[str, int], list[float]] = {
        (name, size): [] for name, _ in configs for size in sizes
    }
    for _ in range(rounds):  # interleaved, so that a busy neighbour slows every configuration
        for name, modules in configs:
            for size in sizes:
                runs[name, size] += measure(rows, size, repeat, modules)["runs"]
    print(f"{rows} rows, {rounds}x{repeat} runs each, CPU µs per row (process time): min / median")
    print(f"{'configuration':34}" + "".join(f"{f'{s}-row txns':>26}" for s in sizes))
    for name, _ in configs:
        cells = []
        for size in sizes:
            best, middle = min(runs[name, size]), statistics.median(runs[name, size])
            gain = min(runs["pure-python", size]) / best
            cells.append(f"{best:6.2f} / {middle:6.2f} {gain:4.2f}x")
        print(f"{name:34}" + "".join(f"{c:>26}" for c in cells), flush=True)


if __name__ == "__main__":
    main()

"""The compiled hot path and the pure-Python reference are indistinguishable (issue 20).

Two long-lived workers (``python -m devtools.hotpath``) run the same modules,
one compiled by Cython, one with ``CDC_RELAY_PURE_PYTHON=1``. Hypothesis
generates pgoutput streams (transactions of outbox rows, good and bad; other
tables; emitted messages, signed or forged; relation changes; keepalives)
interleaved with broker events (acks, nacks, returns, a closed channel); both
workers must answer the same transcript: every AMQP byte written, every dead
letter, every failure and the flush position after every step.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import select
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdc_relay.accel import COMPILED_NAME, PURE_ENV, PURE_NAME, decide
from cdc_relay.pg.pgoutput import Begin, Column, Commit, Insert, LogicalMessage, Relation
from cdc_relay.rows import OUTBOX_COLUMNS
from devtools.hotpath import EMIT_KEY, OUTBOX_RELID
from tests.pgoutput_encoder import encode

ROOT = Path(__file__).resolve().parent.parent
OTHER_RELID = 16401
COLUMNS = OUTBOX_COLUMNS
REPLY_TIMEOUT = 60.0
ROUTERS: list[dict[str, Any]] = [
    {},
    {"exchange": "events", "routing_key_template": "{event_type}", "allow_cc_headers": True},
    {"routing_key_template": "{aggregate_type}.{aggregate_id}", "max_message_size": 2000},
    {"message_format": "celery", "exchange": "celery"},
    {"allowed_exchanges": ["outbox", "x"]},
]


class Worker:
    """One ``devtools.hotpath`` process; every reply awaited for a bounded time."""

    def __init__(self, pure: bool) -> None:
        env = {k: v for k, v in os.environ.items() if k != PURE_ENV}
        if pure:
            env[PURE_ENV] = "1"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "devtools.hotpath"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.implementation = orjson.loads(self._line())["implementation"]

    def _line(self) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], REPLY_TIMEOUT)
        assert ready, f"no answer from the worker within {REPLY_TIMEOUT}s"
        line = self.proc.stdout.readline()
        assert line, f"the worker exited ({self.proc.poll()})"
        return line

    def run(self, script: list[list[Any]], router: dict[str, Any]) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(orjson.dumps({"script": script, "router": router}).decode() + "\n")
        self.proc.stdin.flush()
        return orjson.loads(self._line())

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def workers() -> Iterator[tuple[Worker, Worker]]:
    choice = decide({k: v for k, v in os.environ.items() if k != PURE_ENV})
    if choice.implementation != COMPILED_NAME:
        pytest.fail(
            f"the compiled modules cannot load ({choice.reason}): build them with "
            "`python setup.py build_ext --inplace` (make test does)"
        )
    compiled, pure = Worker(pure=False), Worker(pure=True)
    try:
        assert (compiled.implementation, pure.implementation) == (COMPILED_NAME, PURE_NAME)
        yield compiled, pure
    finally:
        compiled.close()
        pure.close()


# -- the generated streams ------------------------------------------------------

TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12)
SHORT = st.sampled_from(["order", "a.b", "x", "", "é", "#", "*", "cc"]) | TEXT
JSON_SCALAR = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | TEXT
)
JSON = st.recursive(
    JSON_SCALAR,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(SHORT, inner, max_size=3),
    max_leaves=8,
)
BIG_NUMBERS = st.just(b'{"big": 1e400, "n": 123456789012345678901234567890}')
HEADERS = st.dictionaries(
    st.sampled_from(["CC", "BCC", "trace", "x-a", "", "content_type"]) | TEXT, JSON, max_size=4
)


@st.composite
def row_values(draw: st.DrawFn, n: int) -> dict[str, bytes | None]:
    """One outbox row's column texts, mostly valid, sometimes each field broken."""
    maybe_none = st.none() | st.just(b"")

    def text(default: st.SearchStrategy[bytes]) -> bytes | None:
        if draw(st.integers(0, 15)) == 0:  # one field in 16 broken
            return draw(maybe_none | st.binary(max_size=8))
        return draw(default)

    return {
        "id": text(st.just(f"00000000-0000-0000-0000-{n:012d}".encode())),
        "aggregate_type": text(SHORT.map(str.encode)),
        "aggregate_id": text(st.just(str(n).encode())),
        "event_type": text(SHORT.map(str.encode)),
        "payload": draw(st.binary(max_size=6000) | JSON.map(orjson.dumps)),
        "headers": text(HEADERS.map(orjson.dumps) if draw(st.integers(0, 15)) else BIG_NUMBERS),
        "exchange": draw(st.none() | st.sampled_from([b"outbox", b"x", b"events", b"bad ex"])),
        "routing_key": draw(st.none() | SHORT.map(str.encode)),
        "created_at": text(
            st.sampled_from([b"2026-11-23 10:11:12+00", b"2026-11-23 10:11:12.123456+05:30"])
        ),
    }


def xlog(message: Any, lsn: int) -> str:
    header = b"w" + lsn.to_bytes(8, "big") + lsn.to_bytes(8, "big") + (0).to_bytes(8, "big")
    return (header + encode(message)).hex()


def emitted(row: dict[str, bytes | None], signed: bool) -> bytes:
    """What the emit function writes (text fields as JSON strings), signed or forged."""
    body = orjson.dumps({k: v.decode("utf-8", "replace") for k, v in row.items() if v is not None})
    mac = hmac.new(EMIT_KEY if signed else b"forged", body, hashlib.sha256).hexdigest()
    return mac.encode() + body


ROW = st.tuples(st.sampled_from(["outbox"] * 6 + ["other", "emit", "emit", "forged"]))
BROKER = st.one_of(
    st.tuples(st.just("ack"), st.integers(0, 50), st.booleans()),
    st.tuples(st.just("ack"), st.integers(0, 50), st.booleans()),
    st.tuples(st.just("nack"), st.integers(0, 50), st.booleans()),
    st.tuples(st.just("return"), st.integers(0, 50)),
    st.tuples(st.just("close"), st.integers(0, 50)),
)


@st.composite
def scripts(draw: st.DrawFn) -> list[list[Any]]:
    """Relation first (as the walsender sends it), then transactions, keepalives, outcomes."""
    lsn = 0x1000
    n = 0
    columns = COLUMNS
    script: list[list[Any]] = []

    def relation(relid: int, name: str, cols: tuple[str, ...]) -> list[Any]:
        described = tuple(Column(int(c == "id"), c, 25, -1) for c in cols)
        return ["frame", xlog(Relation(relid, "public", name, "d", described), lsn)]

    script.append(relation(OUTBOX_RELID, "outbox", columns))
    script.append(relation(OTHER_RELID, "other", ("id", "note")))
    for _ in range(draw(st.integers(1, 12))):
        unit = draw(st.sampled_from(["txn", "txn", "txn", "broker", "broker", "keepalive", "ddl"]))
        if unit == "broker":
            script.append(list(draw(BROKER)))
        elif unit == "keepalive":
            script.append(["keepalive", lsn + draw(st.integers(0, 0x40))])
        elif unit == "ddl":  # the outbox re-described: columns reordered, dropped or added
            columns = tuple(draw(st.permutations(COLUMNS)))
            columns = columns[: draw(st.sampled_from([5, 8, 9, 9, 9, 9]))]
            columns += ("extra",) * draw(st.booleans())
            script.append(relation(OUTBOX_RELID, "outbox", columns))
        else:
            ts = draw(st.integers(0, 2**50))
            script.append(["frame", xlog(Begin(lsn + 0x30, ts, 700), lsn)])
            for (kind,) in draw(st.lists(ROW, max_size=5)):
                n += 1
                lsn += 0x10
                row = draw(row_values(n))
                if kind == "outbox":
                    values = tuple(b"x" if c == "extra" else row[c] for c in columns)
                    script.append(["frame", xlog(Insert(OUTBOX_RELID, values), lsn)])
                elif kind == "other":
                    script.append(["frame", xlog(Insert(OTHER_RELID, (b"1", b"n")), lsn)])
                else:
                    content = emitted(row, signed=kind == "emit")
                    message = LogicalMessage(True, lsn, "cdc_relay", content)
                    script.append(["frame", xlog(message, lsn)])
            lsn += 0x30
            script.append(["frame", xlog(Commit(0, lsn, lsn + 0x8, ts), lsn + 0x8)])
            lsn += 0x10
    return script


@settings(
    max_examples=int(os.environ.get("CDC_RELAY_TEST_ACCEL_EXAMPLES", "400")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(script=scripts(), router=st.sampled_from(ROUTERS))
def test_compiled_and_pure_python_write_the_same_frames_and_flush_the_same(
    workers: tuple[Worker, Worker], script: list[list[Any]], router: dict[str, Any]
) -> None:
    compiled, pure = workers
    expected = pure.run(script, router)
    assert compiled.run(script, router) == expected


def test_the_generated_streams_exercise_every_outcome(workers: tuple[Worker, Worker]) -> None:
    """The transcripts hold publishes, dead letters, failures and a moving flush position.

    Guards the differential test against comparing two empty transcripts.
    """
    compiled, _ = workers
    seen: set[str] = set()
    flushes: set[int] = set()

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(script=scripts(), router=st.sampled_from(ROUTERS))
    def collect(script: list[list[Any]], router: dict[str, Any]) -> None:
        for entry in compiled.run(script, router):
            seen.add(entry[0])
            if entry[0] == "flush":
                flushes.add(entry[1])

    collect()
    assert {"publish", "dead", "error", "outcome", "flush"} <= seen, seen
    assert len(flushes) > 10

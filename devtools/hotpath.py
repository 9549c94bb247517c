"""The relay's hot path without servers: frames and broker events in, a transcript out.

``run`` drives ``SessionCore``, ``ConfirmWindow`` and ``PublishEncoder`` the way
the session and the publisher do, and writes down everything an outsider could
observe: the AMQP bytes of each publish, each dead letter, each failure and the
flush position after every step. The accelerator's differential tests
(tests/test_accel_differential.py) compare the transcripts of the compiled and
the pure-Python modules; devtools/accel_bench.py times the same loop.

A script is a list of steps, JSON-friendly so that it can cross a pipe:
``["frame", hex]``, ``["ack", offset, multiple]``, ``["nack", offset, multiple]``,
``["return", offset]`` (a basic.return then its ack), ``["close", offset]``
(the channel closed, blaming one publish's exchange) and ``["keepalive", wal_end]``.
An offset picks an unsettled publish, oldest first (modulo their count), so that
every generated script is meaningful; with none unsettled the step is recorded
as skipped.
"""

from __future__ import annotations

import sys
from typing import Any

import orjson

from cdc_relay.accel import implementation
from cdc_relay.amqp.window import ConfirmWindow, PublishFailed
from cdc_relay.amqp_wire import PublishEncoder
from cdc_relay.core import PendingDeadLetter, SessionCore, SessionFailed
from cdc_relay.envelope import Envelope
from cdc_relay.limits import Recheck
from cdc_relay.router import Router

OUTBOX_RELID = 16391
EMIT_KEY = bytes(range(64))
Step = list[Any]


def make_core(router_options: dict[str, Any] | None = None) -> SessionCore:
    return SessionCore(
        outbox_relid=OUTBOX_RELID,
        table="public.outbox",
        router=Router(**(router_options or {})),
        start_flush=0,
        max_message_size=1 << 20,
        emit_key=EMIT_KEY,
    )


class Driver:
    """One session's core, window and encoder, fed step by step."""

    def __init__(self, router_options: dict[str, Any] | None = None, frame_max: int = 4096):
        self.core = make_core(router_options)
        self.window = ConfirmWindow(1 << 30, 1 << 50)
        self.encoder = PublishEncoder(1, frame_max)
        self.unsettled: list[tuple[int, str, str]] = []  # (tag, message id, exchange)

    def publish(self, envelope: Envelope, out: list[Any]) -> None:
        data = self.encoder.encode(envelope)
        tag = self.window.add(
            self.core.last_seq, envelope.message_id, envelope.exchange, len(data), 0.0
        )
        self.unsettled.append((tag, envelope.message_id, envelope.exchange))
        out.append(["publish", self.core.last_seq, tag, data.hex()])

    def frame(self, frame: bytes, out: list[Any]) -> None:
        action = self.core.receive(frame)
        if type(action) is Recheck:  # no remembered refusal here unless a close made one
            action = self.core.rechecked(action)
        if type(action) is Envelope:
            self.publish(action, out)
        elif type(action) is PendingDeadLetter:
            self.dead([action], out)
        elif action is not None:
            out.append(["action", repr(action)])

    def dead(self, letters: list[PendingDeadLetter], out: list[Any]) -> None:
        for letter in letters:
            out.append(["dead", repr(letter)])
        if letters:
            self.core.stored([letter.seq for letter in letters], 0.0)

    def _pick(self, offset: int) -> tuple[int, str, str] | None:
        return self.unsettled[offset % len(self.unsettled)] if self.unsettled else None

    def settle(self, kind: str, offset: int, multiple: bool, out: list[Any]) -> None:
        picked = self._pick(offset)
        if picked is None:
            out.append(["skipped", kind])
            return
        tag, message_id, exchange = picked
        if kind == "return":
            self.window.returned(message_id, PublishFailed("NO_ROUTE", returned=True))
        if kind == "close":
            error = PublishFailed("channel closed", reply_code=404, refused_exchange=exchange)
            outcome = self.window.fail_all(error)
            self.unsettled = []
        else:
            settle = self.window.nack if kind == "nack" else self.window.ack
            outcome = settle(tag, multiple)
            self.unsettled = [
                u for u in self.unsettled if u[0] > tag or (u[0] < tag and not multiple)
            ]
        failed = [[seq, error.reason] for seq, error in outcome.failed]
        out.append(["outcome", outcome.confirmed, failed, repr(outcome.lost)])
        self.dead(self.core.settle(outcome, 0.0), out)

    def step(self, step: Step, out: list[Any]) -> None:
        kind = step[0]
        try:
            if kind == "frame":
                self.frame(bytes.fromhex(step[1]), out)
            elif kind == "keepalive":
                self.frame(keepalive(step[1]), out)
            elif kind in ("ack", "nack"):
                self.settle(kind, step[1], step[2], out)
            else:
                self.settle(kind, step[1], False, out)
        except (SessionFailed, PublishFailed, ValueError) as exc:
            out.append(["error", type(exc).__name__, str(exc)])
        out.append(["flush", self.core.flush_lsn, list(self.core.status_positions())])


def keepalive(wal_end: int, reply: bool = False) -> bytes:
    return b"k" + wal_end.to_bytes(8, "big") + (0).to_bytes(8, "big") + bytes([reply])


def run(script: list[Step], router_options: dict[str, Any] | None = None) -> list[Any]:
    """The transcript of one script through a fresh session."""
    driver = Driver(router_options)
    out: list[Any] = []
    for step in script:
        driver.step(step, out)
    return out


def serve() -> None:
    """A worker for the differential tests: one JSON request per line in, a transcript out."""
    print(orjson.dumps({"implementation": implementation()}).decode(), flush=True)
    for line in sys.stdin:
        request = orjson.loads(line)
        transcript = run(request["script"], request.get("router"))
        sys.stdout.write(orjson.dumps(transcript).decode() + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    serve()

"""The replication protocol steps, driven without a server.

``FakePgconn`` plays libpq's nonblocking calls from a script: each
``consume_input`` moves the next scripted arrival into libpq's "buffer", from
which ``get_copy_data`` and ``get_result`` answer, and ``is_busy`` is true while
no result is buffered, as in libpq. ``drive`` plays the waiter: it answers each
yielded ``Wait`` with the matching ``Ready`` and records the waits, so a test
sees exactly when a step would have blocked on the socket.
"""

from __future__ import annotations

import os
import socket
import struct
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from psycopg import pq

from cdc_relay.pg.replication import (
    ReplicationError,
    ReplicationStream,
    SlotInUse,
    StreamEnded,
    execute,
    read_copy_frames,
    send_copy_data,
    start_replication,
)
from cdc_relay.pg.waiting import PQGen, Ready, Wait
from cdc_relay.pg.walproto import pg_now_us

END_OF_COPY = object()  # get_copy_data -> -1: the server left COPY mode
COMMAND_DONE = object()  # get_result -> None: the command has no more results


@dataclass
class FakeResult:
    """Just what the generators read from a PGresult."""

    status: pq.ExecStatus
    sqlstate: str | None = None
    message: str = ""
    values: list[list[bytes | None]] = field(default_factory=list)

    def error_field(self, code: pq.DiagnosticField) -> bytes | None:
        if code == pq.DiagnosticField.SQLSTATE:
            return self.sqlstate.encode() if self.sqlstate else None
        if code == pq.DiagnosticField.MESSAGE_PRIMARY:
            return self.message.encode() or None
        return None

    @property
    def error_message(self) -> bytes:
        return self.message.encode()

    @property
    def ntuples(self) -> int:
        return len(self.values)

    def get_value(self, row: int, column: int) -> bytes | None:
        return self.values[row][column]


Item = bytes | FakeResult | object | Exception


class FakePgconn:
    """libpq in nonblocking mode, replaying scripted arrivals (one per consume_input)."""

    def __init__(
        self,
        buffered: Iterable[Item] = (),
        arrivals: Iterable[Iterable[Item]] = (),
        put_results: Iterable[int] = (),
        flush_results: Iterable[int] = (),
    ) -> None:
        self.buffer: deque[Any] = deque(buffered)
        self.arrivals: deque[list[Any]] = deque(list(a) for a in arrivals)
        self.put_results = deque(put_results)
        self.flush_results = deque(flush_results)
        self.sent_queries: list[bytes] = []
        self.queued: list[bytes] = []
        self.calls: list[str] = []
        self.copying = True

    def send_query(self, command: bytes) -> None:
        self.sent_queries.append(command)

    def flush(self) -> int:
        self.calls.append("flush")
        return self.flush_results.popleft() if self.flush_results else 0

    def consume_input(self) -> None:
        self.calls.append("consume_input")
        if not self.arrivals:
            return  # nothing on the socket: libpq reads nothing, no error
        for item in self.arrivals.popleft():
            if isinstance(item, Exception):
                raise item
            self.buffer.append(item)

    def is_busy(self) -> int:
        return 0 if self.buffer and not isinstance(self.buffer[0], bytes) else 1

    def get_result(self) -> Any:
        head = self.buffer.popleft()
        assert head is not END_OF_COPY and not isinstance(head, bytes), "not a result"
        return None if head is COMMAND_DONE else head

    def get_copy_data(self, async_: int) -> tuple[int, memoryview]:
        assert async_ == 1, "the generators never block in libpq"
        if not self.copying:  # libpq's PQgetCopyData after it returned -1
            raise psycopg.OperationalError("receiving copy data failed: no COPY in progress")
        if not self.buffer:
            return 0, memoryview(b"")
        head = self.buffer[0]
        if isinstance(head, bytes):
            self.buffer.popleft()
            return len(head), memoryview(head)
        if head is END_OF_COPY:
            self.buffer.popleft()
            self.copying = False
            return -1, memoryview(b"")
        return 0, memoryview(b"")

    def put_copy_data(self, buffer: bytes) -> int:
        result = self.put_results.popleft() if self.put_results else 1
        if result == 1:
            self.queued.append(buffer)
        return result


def drive(gen: PQGen[Any], ready: dict[Wait, Ready] | None = None) -> tuple[Any, list[Wait]]:
    """Run a generator as the waiter would; return its value and the waits it yielded."""
    answers = ready or {}
    waits: list[Wait] = []
    try:
        wait = next(gen)
        while True:
            waits.append(wait)
            assert len(waits) < 100, "the generator never finishes"
            wait = gen.send(answers.get(wait, Ready(int(wait))))
    except StopIteration as done:
        return done.value, waits


def error_result(sqlstate: str, message: str) -> FakeResult:
    return FakeResult(pq.ExecStatus.FATAL_ERROR, sqlstate, message)


COPY_BOTH = FakeResult(pq.ExecStatus.COPY_BOTH)
COMMAND_OK = FakeResult(pq.ExecStatus.COMMAND_OK)
QUERY = b"START_REPLICATION SLOT s LOGICAL 0/0"


# -- start ---------------------------------------------------------------------------


def test_start_waits_for_copy_both() -> None:
    pgconn = FakePgconn(arrivals=[[], [COPY_BOTH]])
    value, waits = drive(start_replication(pgconn, QUERY))
    assert value is None
    assert pgconn.sent_queries == [QUERY]
    assert waits == [Wait.R, Wait.R]  # one empty read, then the COPY_BOTH result


def test_start_already_answered_does_not_wait() -> None:
    pgconn = FakePgconn(buffered=[COPY_BOTH])
    assert drive(start_replication(pgconn, QUERY)) == (None, [])


def test_start_refused_with_55006_is_slot_in_use() -> None:
    refused = error_result("55006", 'replication slot "s" is active for PID 42')
    pgconn = FakePgconn(arrivals=[[refused, COMMAND_DONE]])
    with pytest.raises(SlotInUse) as caught:
        drive(start_replication(pgconn, QUERY))
    assert caught.value.sqlstate == "55006"
    assert "is active for PID 42" in str(caught.value)
    assert not pgconn.buffer  # the error and the end of the command were both consumed


def test_start_refused_otherwise_is_replication_error_with_sqlstate() -> None:
    missing = error_result("42704", 'replication slot "s" does not exist')
    pgconn = FakePgconn(arrivals=[[missing, COMMAND_DONE]])
    with pytest.raises(ReplicationError) as caught:
        drive(start_replication(pgconn, QUERY))
    assert type(caught.value) is ReplicationError
    assert caught.value.sqlstate == "42704"
    assert str(caught.value) == (
        'START_REPLICATION failed: replication slot "s" does not exist (SQLSTATE 42704)'
    )


def test_start_without_any_result_is_an_error() -> None:
    pgconn = FakePgconn(buffered=[COMMAND_DONE])
    with pytest.raises(ReplicationError, match="no result from server"):
        drive(start_replication(pgconn, QUERY))


def test_start_on_a_lost_connection_is_replication_error() -> None:
    lost = psycopg.OperationalError("server closed the connection unexpectedly")
    pgconn = FakePgconn(arrivals=[[lost]])
    with pytest.raises(ReplicationError, match="connection lost: server closed") as caught:
        drive(start_replication(pgconn, QUERY))
    assert caught.value.sqlstate is None
    assert isinstance(caught.value.__cause__, psycopg.OperationalError)


def test_start_waits_for_the_query_to_be_sent() -> None:
    pgconn = FakePgconn(flush_results=[1, 1, 0], buffered=[COPY_BOTH])
    _, waits = drive(start_replication(pgconn, QUERY))
    assert waits == [Wait.RW, Wait.RW]  # libpq asks for read-or-write while flushing


def test_flush_consumes_input_when_readable() -> None:
    """PQflush's rule: on read-ready consume input, or a server blocked on us never reads."""
    pgconn = FakePgconn(flush_results=[1, 0], arrivals=[[COPY_BOTH]])
    _, waits = drive(start_replication(pgconn, QUERY), {Wait.RW: Ready.R})
    assert waits == [Wait.RW]
    assert pgconn.calls[:3] == ["flush", "consume_input", "flush"]


# -- frames --------------------------------------------------------------------------


def test_frames_batched_up_to_max() -> None:
    frames = [b"w%d" % i for i in range(7)]
    pgconn = FakePgconn(buffered=frames)
    assert drive(read_copy_frames(pgconn, 3)) == (frames[:3], [])
    assert drive(read_copy_frames(pgconn, 3)) == (frames[3:6], [])
    assert drive(read_copy_frames(pgconn, 3)) == (frames[6:], [])


def test_frames_wait_until_at_least_one() -> None:
    pgconn = FakePgconn(arrivals=[[], [b"k1", b"w2"], [b"w3"]])
    frames, waits = drive(read_copy_frames(pgconn, 10))
    assert frames == [b"k1", b"w2"]  # returns what is there, does not wait to fill up
    assert waits == [Wait.R, Wait.R]
    assert type(frames[0]) is bytes
    assert drive(read_copy_frames(pgconn, 10)) == ([b"w3"], [Wait.R])


def test_stream_end_is_stream_ended() -> None:
    pgconn = FakePgconn(buffered=[END_OF_COPY], arrivals=[[COMMAND_OK, COMMAND_DONE]])
    with pytest.raises(StreamEnded) as caught:
        drive(read_copy_frames(pgconn, 10))
    assert caught.value.sqlstate is None
    assert caught.value.frames == []


def test_stream_end_carries_the_frames_before_it() -> None:
    """libpq leaves COPY mode at the end: those frames cannot wait for another call."""
    pgconn = FakePgconn(buffered=[b"w1", b"w2", END_OF_COPY, COMMAND_OK])
    with pytest.raises(StreamEnded) as caught:
        drive(read_copy_frames(pgconn, 10))
    assert caught.value.frames == [b"w1", b"w2"]


def test_copy_done_from_the_server_is_stream_ended() -> None:
    """A CopyDone in COPY_BOTH leaves libpq in COPY_IN: a clean end too."""
    pgconn = FakePgconn(buffered=[END_OF_COPY, FakeResult(pq.ExecStatus.COPY_IN)])
    with pytest.raises(StreamEnded):
        drive(read_copy_frames(pgconn, 10))


def test_stream_end_waits_for_the_final_result() -> None:
    """After CopyDone the CommandComplete may still be on the wire: wait, never block."""
    pgconn = FakePgconn(buffered=[END_OF_COPY], arrivals=[[], [COMMAND_OK]])
    gen = read_copy_frames(pgconn, 10)
    assert next(gen) == Wait.R
    assert gen.send(Ready.R) == Wait.R
    with pytest.raises(StreamEnded):
        gen.send(Ready.R)


def test_stream_error_is_replication_error_with_sqlstate() -> None:
    gone = error_result("42704", 'publication "nopub" does not exist')
    pgconn = FakePgconn(buffered=[END_OF_COPY, gone])
    with pytest.raises(ReplicationError) as caught:
        drive(read_copy_frames(pgconn, 10))
    assert type(caught.value) is ReplicationError
    assert caught.value.sqlstate == "42704"
    assert 'publication "nopub" does not exist' in str(caught.value)


def test_stream_lost_is_replication_error() -> None:
    pgconn = FakePgconn(arrivals=[[psycopg.OperationalError("SSL SYSCALL error: EOF detected")]])
    with pytest.raises(ReplicationError, match="connection lost: SSL SYSCALL"):
        drive(read_copy_frames(pgconn, 10))


def test_connection_lost_after_frames_carries_them() -> None:
    class LostAfterTwo(FakePgconn):
        def get_copy_data(self, async_: int) -> tuple[int, memoryview]:
            if not self.buffer:
                raise psycopg.OperationalError("receiving copy data failed: lost")
            return super().get_copy_data(async_)

    with pytest.raises(ReplicationError, match="connection lost") as caught:
        drive(read_copy_frames(LostAfterTwo(buffered=[b"w1", b"w2"]), 10))
    assert caught.value.frames == [b"w1", b"w2"]


def test_copy_data_failure_is_replication_error() -> None:
    class Broken(FakePgconn):
        def get_copy_data(self, async_: int) -> tuple[int, memoryview]:
            raise psycopg.OperationalError("receiving copy data failed: boom")

    with pytest.raises(ReplicationError, match="receiving copy data failed"):
        drive(read_copy_frames(Broken(), 10))


# -- status --------------------------------------------------------------------------


def test_send_flushes_without_waiting_when_the_socket_takes_it() -> None:
    pgconn = FakePgconn()
    assert drive(send_copy_data(pgconn, b"r-status")) == (None, [])
    assert pgconn.queued == [b"r-status"]
    assert pgconn.calls == ["flush"]


def test_send_full_buffer_waits_for_write_then_queues() -> None:
    """put_copy_data 0 (libpq's buffer full): wait for the socket, flush, queue again."""
    pgconn = FakePgconn(put_results=[0, 1], flush_results=[1, 1, 0])
    _, waits = drive(send_copy_data(pgconn, b"r-status"), {Wait.RW: Ready.W})
    assert waits == [Wait.RW, Wait.RW]
    assert all(wait & Wait.W for wait in waits)
    assert pgconn.queued == [b"r-status"]
    assert pgconn.calls == ["flush", "flush", "flush"]
    assert not pgconn.flush_results  # flushed until libpq said everything is sent


def test_send_on_a_lost_connection_is_replication_error() -> None:
    class Broken(FakePgconn):
        def put_copy_data(self, buffer: bytes) -> int:
            raise psycopg.OperationalError("sending copy data failed: broken pipe")

    with pytest.raises(ReplicationError, match="connection lost: sending copy data failed"):
        drive(send_copy_data(Broken(), b"r"))


# -- plain commands --------------------------------------------------------------------


def test_execute_collects_every_result_of_the_command() -> None:
    row = FakeResult(pq.ExecStatus.TUPLES_OK, values=[[b"60s"]])
    pgconn = FakePgconn(arrivals=[[row], [COMMAND_DONE]])
    results, waits = drive(execute(pgconn, b"SHOW wal_sender_timeout"))
    assert results == [row]
    assert waits == [Wait.R, Wait.R]


# -- the stream's own state ------------------------------------------------------------


class FakeConnection:
    """What ReplicationStream takes from a psycopg connection: its pgconn."""

    def __init__(self, pgconn: FakePgconn) -> None:
        self.pgconn = pgconn
        pgconn.nonblocking = 0  # type: ignore[attr-defined]
        pgconn.socket = -1  # type: ignore[attr-defined]  # never waited on: all is buffered
        pgconn.ssl_in_use = 0  # type: ignore[attr-defined]
        pgconn.backend_pid = 4242  # type: ignore[attr-defined]


@pytest.mark.asyncio
async def test_stream_hands_out_frames_before_the_end_then_raises_it() -> None:
    pgconn = FakePgconn(buffered=[b"w1", b"w2", END_OF_COPY, COMMAND_OK])
    stream = ReplicationStream(FakeConnection(pgconn))  # type: ignore[arg-type]
    assert pgconn.nonblocking == 1  # type: ignore[attr-defined]
    assert await stream.read_frames() == [b"w1", b"w2"]
    for _ in range(2):  # and stays ended
        with pytest.raises(StreamEnded) as caught:
            await stream.read_frames()
        assert caught.value.frames == []


@pytest.mark.asyncio
async def test_stream_send_status_queues_one_standby_status_update() -> None:
    pgconn = FakePgconn()
    stream = ReplicationStream(FakeConnection(pgconn))  # type: ignore[arg-type]
    before = pg_now_us()
    await stream.send_status(300, 200, 100, reply_requested=True)
    (message,) = pgconn.queued
    tag, write, flush, apply, clock, reply = struct.unpack("!cQQQqB", message)
    assert (tag, write, flush, apply, reply) == (b"r", 300, 200, 100, 1)
    assert before <= clock <= pg_now_us()
    assert pgconn.calls == ["flush"]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.lists(st.binary(min_size=1, max_size=5), max_size=6), max_size=8),
    st.integers(1, 5),
)
def test_any_arrival_pattern_yields_every_frame_in_order(
    arrivals: list[list[bytes]], max_frames: int
) -> None:
    """However the frames arrive, batches are non-empty, bounded, in order, and
    a step waits only when libpq has nothing buffered."""
    pgconn = FakePgconn(arrivals=[*arrivals, [END_OF_COPY, COMMAND_OK]])
    expected = [frame for arrival in arrivals for frame in arrival]
    received: list[bytes] = []
    while True:
        gen = read_copy_frames(pgconn, max_frames)
        try:
            wait = next(gen)
            while True:
                assert wait == Wait.R and not pgconn.buffer  # nothing left behind
                wait = gen.send(Ready.R)
        except StopIteration as done:
            batch = done.value
        except StreamEnded as end:
            received += end.frames
            break
        assert 1 <= len(batch) <= max_frames
        received += batch
    assert received == expected


def test_the_relay_names_itself_by_host_and_pid_within_63_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cdc_relay.pg.replication import connection_kwargs, relay_application_name

    assert connection_kwargs()["application_name"] == relay_application_name()
    assert relay_application_name().endswith(f":{os.getpid()}")
    monkeypatch.setattr(socket, "gethostname", lambda: "h" * 200)
    name = relay_application_name()
    assert len(name.encode()) == 63 and name.endswith(f":{os.getpid()}")

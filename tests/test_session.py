"""The session's end of life, against fakes of our own interfaces (no servers).

The fakes stand in for ``ReplicationStream``, ``Publisher``, ``DeadLetterWriter``
and ``StateWriter``: what a session does with them (stop cleanly within the
deadline, skip the waiting on a second signal, settle after a nack, end on the
failure of any task, not hang on a partitioned peer) is decided in
``session.py`` and ``tasks.py``, which these tests drive. What Postgres and
RabbitMQ do is covered by the integration tests (test_relay_e2e, test_faults,
test_publisher_settle, ...).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import psycopg
import pytest

from cdc_relay import loops
from cdc_relay import session as session_module
from cdc_relay.amqp import Outcome, PublishFailed
from cdc_relay.config import Settings
from cdc_relay.core import PublishRefused, SessionFailed
from cdc_relay.deadletters import DeadLetterSink, DeadLetterWriteFailed
from cdc_relay.envelope import Envelope
from cdc_relay.errors import SessionError
from cdc_relay.limits import BrokerLimits
from cdc_relay.metrics import Metrics
from cdc_relay.pg.replication import ReplicationError
from cdc_relay.session import Session, Streaming
from cdc_relay.tasks import SessionTasks
from tests.test_core import begin, commit, insert, keepalive, make_core, relation

pytestmark = pytest.mark.asyncio

START = 0x1000


class FakeStream:
    """The replication stream: frames the test puts, status updates it records."""

    def __init__(self) -> None:
        self.frames: asyncio.Queue[bytes] = asyncio.Queue()
        self.statuses: list[int] = []
        self.last_receive = time.monotonic()
        self.waiting_for_data = False
        self.backend_pid = 1
        self.fail_read: BaseException | None = None
        self.fail_status: BaseException | None = None
        self.partitioned = False  # every call hangs, like a peer behind a dropped link
        self.closed = False

    def put(self, *frames: bytes) -> None:
        for frame in frames:
            self.frames.put_nowait(frame)

    async def read_frames(self) -> list[bytes]:
        if self.fail_read is not None:
            raise self.fail_read
        batch = [await self.frames.get()]
        while not self.frames.empty():
            batch.append(self.frames.get_nowait())
        return batch

    async def send_status(self, write: int, flush: int, apply: int, reply: bool) -> None:
        if self.partitioned:
            await asyncio.Event().wait()
        if self.fail_status is not None:
            raise self.fail_status
        self.statuses.append(flush)

    async def close(self) -> None:
        if self.partitioned:
            await asyncio.Event().wait()
        self.closed = True


class FakePublisher:
    """The confirm-mode publisher: the test acks and nacks what was published."""

    def __init__(self, on_outcome: Any) -> None:
        self.on_outcome = on_outcome
        self.published: list[int] = []
        self.unsettled: set[int] = set()
        self.settled = asyncio.Event()
        self.blocked = False
        self.connected_url = "amqp://fake"
        self.closed = False

    @property
    def in_flight(self) -> int:
        return len(self.unsettled)

    @property
    def in_flight_bytes(self) -> int:
        return 100 * len(self.unsettled)

    def publish_nowait(self, seq: int, envelope: Envelope) -> bool:
        return False  # the session then awaits publish

    async def publish(self, seq: int, envelope: Envelope) -> None:
        self.published.append(seq)
        self.unsettled.add(seq)

    async def try_publish(self, envelope: Envelope) -> PublishFailed | None:
        return None

    def report(self, outcome: Outcome) -> None:
        self.unsettled -= set(outcome.confirmed) | {seq for seq, _ in outcome.failed}
        self.on_outcome(outcome)
        self.settled.set()

    def ack(self, *seqs: int) -> None:
        self.report(Outcome(list(seqs), [], None))

    def nack(self, seq: int) -> None:
        self.report(Outcome([], [(seq, PublishFailed("nacked by broker"))], None))

    async def wait_confirmed(self, timeout: float) -> bool:
        async def drained() -> None:
            while self.unsettled:
                self.settled.clear()
                await self.settled.wait()

        try:
            await asyncio.wait_for(drained(), timeout)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        self.closed = True


class FakeDeadLetters:
    """The dead-letter writer; ``fail`` makes every write raise it."""

    def __init__(self) -> None:
        self.written: list[Any] = []
        self.fail: BaseException | None = None

    async def write(self, letters: list[Any]) -> None:
        if self.fail is not None:
            raise self.fail
        self.written.extend(letters)

    async def close(self) -> None:
        pass


class FakeState:
    """The state writer: records the final position and the retirement."""

    def __init__(self) -> None:
        self.final: int | None = None
        self.retired = False
        self.fail: BaseException | None = None

    async def maybe_write(
        self, now: float, commit_time: float | None, flush: int, final: bool = False
    ) -> None:
        if self.fail is not None:
            raise self.fail
        if final:
            self.final = flush

    async def maybe_report(self, now: float, health: Any) -> None:
        pass

    async def retire(self) -> None:
        self.retired = True

    async def close(self) -> None:
        pass


class FakeSession(Session):
    """A session whose ``_open`` opens the fakes instead of connections."""

    def __init__(self, **settings: Any) -> None:
        settings.setdefault("stats_interval", 3600.0)
        settings.setdefault("shutdown_timeout", 5.0)
        s = Settings(**settings)
        core, _ = make_core(START)
        super().__init__(
            s, Metrics(), core.router, BrokerLimits.empty(), asyncio.Event(), asyncio.Event()
        )
        self.fake_core = core
        self.stream = FakeStream()
        self.publisher = FakePublisher(self._on_outcome)
        self.dead_letters = FakeDeadLetters()
        self.state = FakeState()
        self.running: asyncio.Task[None] | None = None

    async def _open(self) -> Streaming | None:
        self.wal = ("7", 1)
        self.core = core = self.fake_core
        conns = self.conns
        conns.stream, conns.publisher = self.stream, self.publisher  # type: ignore[assignment]
        conns.dead_letters, conns.state = self.dead_letters, self.state  # type: ignore[assignment]
        self.sink = sink = DeadLetterSink(self.dead_letters, self._stored)  # type: ignore[arg-type]
        self.streamed = True
        return Streaming(self.stream, self.publisher, core, sink, self.state, 0)  # type: ignore[arg-type]


async def until(condition: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


async def started(session: FakeSession) -> FakeSession:
    """The session running (``session.running``), its outbox described to the core."""
    session.running = asyncio.create_task(session.run())
    await until(lambda: session.core is not None)
    session.stream.put(relation())
    return session


async def test_a_clean_stop_finishes_the_transaction_and_reports_its_end() -> None:
    session = await started(FakeSession())
    session.stream.put(begin(0x2000), insert(1), insert(2))
    await until(lambda: session.publisher.published == [1, 2])
    session.stop.set()
    await until(lambda: session.fake_core.stop_requested)  # asked to stop at the Commit
    session.stream.put(commit(0x2000, 0x2030), begin(0x3000), insert(3))
    session.publisher.ack(1, 2)
    await asyncio.wait_for(session.running, 5)
    assert session.publisher.published == [1, 2]  # nothing read past the Commit
    assert session.stream.statuses[-1] == 0x2030 == session.state.final
    assert session.state.retired and session.stream.closed and session.publisher.closed
    assert session.confirmed.position is not None and session.confirmed.position.lsn == 0x2030


async def test_a_clean_stop_gives_up_waiting_at_the_shutdown_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    session = await started(FakeSession(shutdown_timeout=0.3))
    session.stream.put(begin(0x2000), insert(1), commit(0x2000, 0x2030))
    await until(lambda: session.publisher.published == [1])
    began = time.monotonic()
    session.stop.set()
    await asyncio.wait_for(session.running, 5)  # the broker never confirms
    assert time.monotonic() - began < 1.5
    assert "stopping with 1 unconfirmed message(s)" in caplog.text
    assert session.stream.statuses[-1] == START  # the row is sent again by the next run


async def test_a_second_signal_skips_the_waiting() -> None:
    session = await started(FakeSession(shutdown_timeout=60))
    session.stream.put(begin(0x2000), insert(1), commit(0x2000, 0x2030))
    await until(lambda: session.publisher.published == [1])
    began = time.monotonic()
    session.stop.set()
    await asyncio.sleep(0.05)
    session.abort.set()
    await asyncio.wait_for(session.running, 5)
    assert time.monotonic() - began < 1.0


async def test_a_nack_ends_the_session_after_the_acks_of_what_went_before() -> None:
    session = await started(FakeSession())
    publisher = session.publisher
    session.stream.put(begin(0x2000), insert(1), commit(0x2000, 0x2030))
    session.stream.put(begin(0x3000), insert(2), commit(0x3000, 0x3030))
    await until(lambda: publisher.published == [1, 2])
    publisher.nack(2)  # overtakes the ack of row 1 (RabbitMQ acks after its fsync)
    session.stream.put(begin(0x4000), insert(3), commit(0x4000, 0x4030))
    await asyncio.sleep(0.05)
    publisher.ack(1)
    with pytest.raises(PublishRefused, match="nacked"):
        await asyncio.wait_for(session.running, 5)
    assert publisher.published == [1, 2]  # nothing new after the nack
    assert session.stream.statuses[-1] == 0x2030  # row 1 is not replayed
    assert session.end_logged


async def test_a_dead_letter_write_failure_ends_the_session() -> None:
    session = await started(FakeSession())
    session.dead_letters.fail = psycopg.OperationalError("connection lost")
    session.stream.put(begin(0x2000), relation(relid=99, name="other"), insert(1, relid=99))
    with pytest.raises(DeadLetterWriteFailed, match="cannot store dead letters"):
        await asyncio.wait_for(session.running, 5)


@pytest.mark.parametrize("where", ["read", "status", "state"])
async def test_the_failure_of_any_task_ends_the_session_once(
    where: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(loops, "STATE_CHECK_INTERVAL", 0.01)
    session = await started(FakeSession())
    error: SessionError | psycopg.Error = ReplicationError("walsender gone")
    if where == "read":
        session.stream.fail_read = error
        session.stream.put(keepalive(START))  # wakes the pump's read
    elif where == "status":
        session.stream.fail_status = error
        session.stream.put(keepalive(0x2000, reply=True))  # the server asks for a status
    else:
        error = psycopg.OperationalError("state row unwritable")
        session.state.fail = error
    with pytest.raises(type(error)) as failure:
        await asyncio.wait_for(session.running, 5)
    assert failure.value is error
    ended = [r for r in caplog.records if r.message.startswith("session ended")]
    assert len(ended) == 1 and ended[0].levelno == logging.WARNING
    assert session.stream.closed and session.publisher.closed


async def test_a_partitioned_peer_cannot_hang_the_end_of_a_session(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(session_module, "FINAL_STATUS_TIMEOUT", 0.2)
    monkeypatch.setattr(session_module, "CLEANUP_TIMEOUT", 0.2)
    session = await started(FakeSession())
    session.stream.put(begin(0x2000), insert(1), commit(0x2000, 0x2030))
    await until(lambda: session.publisher.published == [1])
    session.publisher.ack(1)  # the flush moved: a final status is due
    session.stream.partitioned = True
    began = time.monotonic()
    session.publisher.report(Outcome([], [], PublishFailed("AMQP connection lost")))
    with pytest.raises(SessionFailed, match="connection lost"):
        await asyncio.wait_for(session.running, 5)
    assert time.monotonic() - began < 1.5
    assert "closing connections took longer" in caplog.text
    assert session.confirmed.position is not None and session.confirmed.position.lsn == 0x2030


async def test_a_task_that_returns_unexpectedly_is_a_failure_and_only_the_first_counts() -> None:
    failures: list[BaseException] = []
    tasks = SessionTasks(on_failure=failures.append)

    async def returns() -> None:
        return None

    async def raises() -> None:
        await asyncio.sleep(0.01)
        raise ReplicationError("later")

    tasks.start("cdc-relay-stats", returns())
    tasks.start("cdc-relay-status", raises())
    await tasks.wait_any()
    await asyncio.sleep(0.05)
    assert [str(f) for f in failures] == ["cdc-relay-stats ended unexpectedly"]
    with pytest.raises(SessionFailed, match="ended unexpectedly"):
        tasks.raise_failure()
    await tasks.cancel_all()


async def test_a_task_may_return_when_its_caller_says_so_and_closing_failures_do_not_count() -> (
    None
):
    tasks = SessionTasks()
    stopping = True

    async def returns() -> None:
        return None

    task = tasks.start("cdc-relay-pump", returns(), may_return=lambda: stopping)
    await tasks.wait_any()
    await task
    assert tasks.first_failure is None
    tasks.closing = True
    tasks.fail(ReplicationError("closing our own connection"))
    assert tasks.first_failure is None

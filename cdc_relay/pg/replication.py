"""One logical replication connection: start at the slot, hand out frames, send status.

psycopg 3 has no replication API, but a ``replication="database"`` connection
can enter COPY_BOTH, and its libpq wrapper (``conn.pgconn``) gives the socket
and nonblocking copy calls. The event loop watches the socket (``add_reader``);
nothing here polls or uses threads. No business logic: the caller decides what
frames mean and which positions to report.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import psycopg
from psycopg import pq, sql

from cdc_relay.pg.pgoutput import encode_standby_status, pg_now_us

log = logging.getLogger(__name__)

SQLSTATE_OBJECT_IN_USE = "55006"
SQLSTATE_UNDEFINED_OBJECT = "42704"
SQLSTATE_PREREQUISITE_STATE = "55000"
MAX_FRAMES_PER_BATCH = 512


class ReplicationError(Exception):
    """The server refused or ended the replication stream."""

    def __init__(self, message: str, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


class SlotInUse(ReplicationError):
    """Another relay streams from the slot: we are the hot standby."""


class StreamEnded(ReplicationError):
    """The server closed the COPY stream (shutdown, timeline end)."""


def _result_error(result: pq.abc.PGresult | None, what: str) -> ReplicationError:
    if result is None:
        return ReplicationError(f"{what}: no result from server")
    raw_state = result.error_field(pq.DiagnosticField.SQLSTATE)
    raw_msg = result.error_field(pq.DiagnosticField.MESSAGE_PRIMARY) or result.error_message
    sqlstate = raw_state.decode() if raw_state else None
    message = raw_msg.decode("utf-8", "replace").strip() if raw_msg else "unknown error"
    text = f"{what}: {message}" + (f" (SQLSTATE {sqlstate})" if sqlstate else "")
    if sqlstate == SQLSTATE_OBJECT_IN_USE:
        return SlotInUse(text, sqlstate)
    return ReplicationError(text, sqlstate)


def connection_kwargs(
    keepalive_idle: int = 10, keepalive_interval: int = 5, keepalive_count: int = 3
) -> dict[str, Any]:
    """libpq settings so a dead or partitioned peer is noticed in bounded time."""
    return {
        "replication": "database",
        "autocommit": True,
        "connect_timeout": 10,
        "application_name": "cdc-relay",
        "keepalives": 1,
        "keepalives_idle": keepalive_idle,
        "keepalives_interval": keepalive_interval,
        "keepalives_count": keepalive_count,
        "tcp_user_timeout": (keepalive_idle + keepalive_interval * keepalive_count) * 1000,
        # pgoutput renders timestamptz in the walsender's session time zone.
        "options": "-c TimeZone=UTC -c DateStyle=ISO",
    }


class ReplicationStream:
    """A started replication stream on a nonblocking libpq connection."""

    def __init__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self._conn = conn
        self._pgconn = conn.pgconn
        self._fd = self._pgconn.socket
        self._loop = asyncio.get_running_loop()
        self.bytes_received = 0
        self._closed = False
        # For liveness checks: when the stream last gave us data, and whether
        # we are waiting for more (not stalled on our own back-pressure).
        self.last_receive = time.monotonic()
        self.waiting_for_data = False

    @classmethod
    async def connect(cls, dsn: str, **kwargs: Any) -> ReplicationStream:
        conn = await psycopg.AsyncConnection.connect(dsn, **connection_kwargs(**kwargs))
        return cls(conn)

    async def start(self, slot: str, publication: str, start_lsn: str = "0/0") -> None:
        """START_REPLICATION; the server resumes at max(start_lsn, confirmed_flush)."""
        query = sql.SQL(
            "START_REPLICATION SLOT {} LOGICAL {} (proto_version '1', publication_names {})"
        ).format(
            sql.Identifier(slot),
            sql.SQL(start_lsn),
            sql.Literal(sql.Identifier(publication).as_string(self._conn)),
        )
        text = query.as_bytes(self._conn)
        pgconn = self._pgconn
        pgconn.nonblocking = 1
        pgconn.send_query(text)
        await self._flush()
        while True:
            pgconn.consume_input()
            if pgconn.is_busy():
                await self._wait(readable=True)
                continue
            result = pgconn.get_result()
            if result is not None and result.status == pq.ExecStatus.COPY_BOTH:
                return
            raise _result_error(result, "START_REPLICATION failed")

    async def read_frames(self) -> list[bytes]:
        """The next CopyData frames (at least one); raise when the stream ends."""
        pgconn = self._pgconn
        while True:
            frames: list[bytes] = []
            while len(frames) < MAX_FRAMES_PER_BATCH:
                size, data = pgconn.get_copy_data(1)
                if size > 0:
                    frames.append(bytes(data))
                    self.bytes_received += size
                elif size == 0:
                    break
                else:
                    if frames:
                        return frames
                    self._raise_end()
            if frames:
                self.last_receive = time.monotonic()
                return frames
            self.waiting_for_data = True
            try:
                await self._wait(readable=True)
            finally:
                self.waiting_for_data = False
            try:
                pgconn.consume_input()
            except psycopg.OperationalError as exc:
                raise ReplicationError(f"replication connection lost: {exc}") from exc

    def _raise_end(self) -> None:
        result = self._pgconn.get_result()
        if result is not None and result.status == pq.ExecStatus.COMMAND_OK:
            raise StreamEnded("server ended the replication stream (shutdown or timeline end)")
        raise _result_error(result, "replication stream ended")

    async def send_status(
        self, write: int, flush: int, apply: int, reply_requested: bool = False
    ) -> None:
        """Standby status update; positions are 'last byte + 1' as the protocol asks."""
        message = encode_standby_status(write, flush, apply, pg_now_us(), reply_requested)
        if self._pgconn.put_copy_data(message) != 1:
            # Nonblocking and libpq's buffer is full: make room, then queue again.
            await self._flush()
            if self._pgconn.put_copy_data(message) != 1:
                raise ReplicationError("could not queue standby status update")
        await self._flush()

    async def _flush(self) -> None:
        while self._pgconn.flush() == 1:
            await self._wait(readable=False)

    async def _wait(self, *, readable: bool) -> None:
        loop = self._loop
        future: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not future.done():
                future.set_result(None)

        if readable:
            loop.add_reader(self._fd, wake)
        else:
            loop.add_writer(self._fd, wake)
        try:
            await future
        finally:
            if readable:
                loop.remove_reader(self._fd)
            else:
                loop.remove_writer(self._fd)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._pgconn.finish()
        finally:
            await self._conn.close()

"""The replication stream over TLS: no stall on bytes OpenSSL has already decrypted.

An event-loop reader wakes only when the *socket* is readable. libpq reads
TLS with SSL_read into at least 8 kB of free buffer, while a TLS record holds
up to 16 kB: the rest of a record can sit decrypted inside OpenSSL where the
socket does not show it. libpq's own blocking waits check SSL_pending first
(pqSocketCheck); an fd reader cannot. Current libpq minors drain OpenSSL's
pending bytes inside pqReadData itself (15.20 and 18.6, both used here, carry
"drained only %zd of %zd pending bytes in transport buffer"), so PQconsumeInput
leaves nothing behind. The test below pins that down against a private Postgres
with ssl=on and trustme certificates, with frames of 1 kB to 200 kB.

No stall was seen with these libpq builds; with a libpq from before that fix,
a vanilla server is still unlikely to trigger one (libpq grows its buffer to
the whole CopyData message first), while a TLS-terminating proxy with other
record boundaries could. Then a stalled frame waits for the walsender's next
keepalive: at once when it is idle and sees ``write`` behind its sent
position, or wal_sender_timeout / 2 at worst.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
import pytest_asyncio
import trustme
from psycopg import sql

from cdc_relay.pg.pgoutput import Commit, Insert, decode_message
from cdc_relay.pg.replication import ReplicationStream
from cdc_relay.pg.walproto import XLogData, decode_copy_data
from devtools.servers import PostgresServer
from tests.fix_pg import ServerFactory

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(300)]

MAX_LSN = 2**64 - 1


@pytest.fixture(scope="module")
def tls_server(pg_factory: ServerFactory[PostgresServer]) -> PostgresServer:
    """A private Postgres with ssl=on, TLS optional (unlike ``pg_tls_server``)."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    server = pg_factory(start=False)
    tls = server.base_dir / "tls"
    tls.mkdir()
    cert.cert_chain_pems[0].write_to_path(str(tls / "server.crt"))
    cert.private_key_pem.write_to_path(str(tls / "server.key"))
    os.chmod(tls / "server.key", 0o600)  # Postgres refuses a key others can read
    server.settings.update(
        ssl="on",
        ssl_cert_file=str(tls / "server.crt"),
        ssl_key_file=str(tls / "server.key"),
    )
    server.start()  # initdb hands base_dir, certificates included, to the server user
    return server


@pytest_asyncio.fixture
async def tls_outbox(tls_server: PostgresServer) -> AsyncIterator[tuple[str, str, str, str]]:
    dsn = f"{tls_server.dsn}?sslmode=require"
    name = f"tls_{uuid.uuid4().hex[:10]}"
    table, pub, slot = name, f"{name}_pub", f"{name}_slot"
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(
            sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, body text NOT NULL)").format(
                sql.Identifier(table)
            )
        )
        await conn.execute(
            sql.SQL("CREATE PUBLICATION {} FOR TABLE {} WITH (publish = 'insert')").format(
                sql.Identifier(pub), sql.Identifier(table)
            )
        )
        await conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
    yield dsn, table, pub, slot


async def test_large_frames_never_wait_for_the_next_packet(
    tls_outbox: tuple[str, str, str, str],
) -> None:
    """Each committed transaction arrives promptly, whatever the size of its frames.

    The status update claims write = the end of WAL, so the walsender does not
    send its "you are behind" keepalives: a frame stuck inside OpenSSL would
    then wait for the next reply-requested keepalive (wal_sender_timeout / 2).
    """
    dsn, table, pub, slot = tls_outbox
    stream = await ReplicationStream.connect(dsn)
    writer = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    try:
        await stream.start(slot, pub)
        await stream.send_status(MAX_LSN, 0, 0)
        async with writer.cursor() as cur:
            await cur.execute(
                "SELECT s.ssl FROM pg_stat_ssl s"
                " JOIN pg_replication_slots r ON r.active_pid = s.pid WHERE r.slot_name = %s",
                (slot,),
            )
            assert await cur.fetchone() == (True,)  # the walsender's connection is TLS
        insert = sql.SQL("INSERT INTO {} VALUES (%s, repeat('x', %s))").format(
            sql.Identifier(table)
        )
        sizes = [*range(1000, 200_000, 4999), *range(8000, 20000, 97)]
        slow: list[tuple[int, float]] = []
        for number, size in enumerate(sizes):
            await writer.execute(insert, (number, size))
            started = time.monotonic()
            seen: list[Any] = []
            try:
                async with asyncio.timeout(5):
                    while not any(isinstance(m, Commit) for m in seen):
                        for raw in await stream.read_frames():
                            frame = decode_copy_data(raw)
                            if isinstance(frame, XLogData):
                                seen.append(decode_message(frame.payload))
            except TimeoutError:
                slow.append((size, time.monotonic() - started))
                break
            inserts = [m for m in seen if isinstance(m, Insert)]
            assert [len(m.new[1]) for m in inserts] == [size]
        assert not slow, f"transactions stalled on the socket: {slow}"
    finally:
        await writer.close()
        await stream.close()

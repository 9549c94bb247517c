"""TLS-only throwaway servers (issue 10): clients must verify, plain connections are refused."""

from __future__ import annotations

import ssl
from pathlib import Path

import aio_pika
import psycopg
import pytest

from devtools.procs import listen_addresses
from devtools.servers import PostgresServer, RabbitServer
from devtools.tls import TlsFiles, make_tls_files
from tests.fix_pg import ServerFactory


def test_pg_accepts_verified_tls_for_sql_and_replication(
    pg_tls_server: PostgresServer, tls_files: TlsFiles
) -> None:
    assert "sslmode=verify-full" in pg_tls_server.dsn
    with psycopg.connect(pg_tls_server.dsn, autocommit=True) as conn:
        assert conn.info.pgconn.ssl_in_use
        (ssl_on,) = conn.execute(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        ).fetchone() or (False,)
        assert ssl_on is True
    with psycopg.connect(pg_tls_server.dsn, replication="database", autocommit=True) as repl:
        assert repl.info.pgconn.ssl_in_use
        assert repl.execute("IDENTIFY_SYSTEM").fetchone() is not None


def test_pg_refuses_plain_connections(pg_tls_server: PostgresServer) -> None:
    plain = f"postgresql://postgres@127.0.0.1:{pg_tls_server.port}/postgres?sslmode=disable"
    with pytest.raises(psycopg.OperationalError, match="no encryption"):
        psycopg.connect(plain, connect_timeout=10)


def test_pg_client_verification_fails_against_another_ca(
    pg_tls_server: PostgresServer, tmp_path: Path
) -> None:
    other = make_tls_files(tmp_path / "other")
    dsn = (
        f"postgresql://postgres@127.0.0.1:{pg_tls_server.port}/postgres"
        f"?sslmode=verify-full&sslrootcert={other.ca}"
    )
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        psycopg.connect(dsn, connect_timeout=10)


# --------------------------------------------------------------------------- RabbitMQ


async def round_trip(url: str, context: ssl.SSLContext) -> bytes | None:
    """Publish one confirmed message to a fresh queue and get it back."""
    connection = await aio_pika.connect(url, ssl_context=context, timeout=10)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(exclusive=True)
        await channel.default_exchange.publish(aio_pika.Message(b"over tls"), queue.name)
        message = await queue.get(timeout=5, fail=False)
        return None if message is None else message.body


@pytest.mark.asyncio
async def test_rabbit_tls_only_listener(
    rabbit_tls_server: RabbitServer, tls_files: TlsFiles
) -> None:
    assert rabbit_tls_server.amqp_url.startswith("amqps://guest:guest@localhost:")
    assert "cacertfile=" in rabbit_tls_server.amqp_url
    assert listen_addresses(rabbit_tls_server.port) == {"127.0.0.1"}
    url = f"amqps://guest:guest@localhost:{rabbit_tls_server.port}/"
    assert await round_trip(url, tls_files.client_context()) == b"over tls"
    # Nothing speaks plain AMQP: a plain client gets no handshake.
    with pytest.raises((ConnectionError, OSError, aio_pika.exceptions.AMQPError)):
        await aio_pika.connect(f"amqp://guest:guest@127.0.0.1:{rabbit_tls_server.port}/", timeout=5)
    # Verification is on: another CA's client refuses the server.
    other = make_tls_files(tls_files.ca.parent / "other")
    with pytest.raises(aio_pika.exceptions.AMQPConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
        await aio_pika.connect(url, ssl_context=other.client_context(), timeout=5)


@pytest.mark.asyncio
async def test_rabbit_external_login_with_a_client_certificate(
    tls_files: TlsFiles, rabbit_factory: ServerFactory[RabbitServer]
) -> None:
    with rabbit_factory.running(tls=tls_files, external=True) as server:
        assert "auth_mechanism=external" in server.external_url
        url = f"amqps://localhost:{server.port}/?auth=external"
        context = tls_files.client_context(with_client_cert=True)
        assert await round_trip(url, context) == b"over tls"
        # No client certificate: the TLS handshake itself is refused.
        with pytest.raises((ConnectionError, OSError, aio_pika.exceptions.AMQPError)):
            await aio_pika.connect(url, ssl_context=tls_files.client_context(), timeout=5)

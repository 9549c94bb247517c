"""TLS-only throwaway servers (issue 10): clients must verify, plain connections are refused."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import psycopg
import pytest

from devtools.servers import PostgresServer, RabbitServer
from devtools.tls import TlsFiles, make_tls_files
from tests.test_devservers import listen_addresses


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_pg(tls_files: TlsFiles) -> Iterator[PostgresServer]:
    with PostgresServer(ssl=tls_files) as server:
        yield server


def test_pg_accepts_verified_tls_for_sql_and_replication(
    tls_pg: PostgresServer, tls_files: TlsFiles
) -> None:
    assert "sslmode=verify-full" in tls_pg.dsn
    with psycopg.connect(tls_pg.dsn, autocommit=True) as conn:
        assert conn.info.pgconn.ssl_in_use
        (ssl_on,) = conn.execute(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        ).fetchone() or (False,)
        assert ssl_on is True
    with psycopg.connect(tls_pg.dsn, replication="database", autocommit=True) as repl:
        assert repl.info.pgconn.ssl_in_use
        assert repl.execute("IDENTIFY_SYSTEM").fetchone() is not None


def test_pg_refuses_plain_connections(tls_pg: PostgresServer) -> None:
    plain = f"postgresql://postgres@127.0.0.1:{tls_pg.port}/postgres?sslmode=disable"
    with pytest.raises(psycopg.OperationalError, match="no encryption"):
        psycopg.connect(plain, connect_timeout=10)


def test_pg_client_verification_fails_against_another_ca(
    tls_pg: PostgresServer, tmp_path: Path
) -> None:
    other = make_tls_files(tmp_path / "other")
    dsn = (
        f"postgresql://postgres@127.0.0.1:{tls_pg.port}/postgres"
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


@pytest.fixture(scope="module")
def tls_rabbit(tls_files: TlsFiles) -> Iterator[RabbitServer]:
    with RabbitServer(tls=tls_files) as server:
        yield server


@pytest.mark.asyncio
async def test_rabbit_tls_only_listener(tls_rabbit: RabbitServer, tls_files: TlsFiles) -> None:
    assert tls_rabbit.amqp_url.startswith("amqps://guest:guest@localhost:")
    assert "cacertfile=" in tls_rabbit.amqp_url
    assert listen_addresses(tls_rabbit.port) == {"127.0.0.1"}
    url = f"amqps://guest:guest@localhost:{tls_rabbit.port}/"
    assert await round_trip(url, tls_files.client_context()) == b"over tls"
    # Nothing speaks plain AMQP: a plain client gets no handshake.
    with pytest.raises((ConnectionError, OSError, aio_pika.exceptions.AMQPError)):
        await aio_pika.connect(f"amqp://guest:guest@127.0.0.1:{tls_rabbit.port}/", timeout=5)
    # Verification is on: another CA's client refuses the server.
    other = make_tls_files(tls_files.ca.parent / "other")
    with pytest.raises(aio_pika.exceptions.AMQPConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
        await aio_pika.connect(url, ssl_context=other.client_context(), timeout=5)


@pytest.mark.asyncio
async def test_rabbit_external_login_with_a_client_certificate(tls_files: TlsFiles) -> None:
    with RabbitServer(tls=tls_files, external=True) as server:
        assert "auth_mechanism=external" in server.external_url
        url = f"amqps://localhost:{server.port}/?auth=external"
        context = tls_files.client_context(with_client_cert=True)
        assert await round_trip(url, context) == b"over tls"
        # No client certificate: the TLS handshake itself is refused.
        with pytest.raises((ConnectionError, OSError, aio_pika.exceptions.AMQPError)):
            await aio_pika.connect(url, ssl_context=tls_files.client_context(), timeout=5)

"""Issue 10 end to end: TLS to both servers, a least-privilege Postgres role, file secrets.

A private Postgres that refuses anything but TLS (``hostssl`` only, and a password for
the relay's role) and a RabbitMQ node with only a TLS listener, both with certificates
made here by trustme. The server certificate names ``localhost`` only, so that
``127.0.0.1`` is a wrong host name for either server. An admin runs ``init --grant-to``
over TLS; ``cdc-relay run`` then works as the granted role and nothing else.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlencode

import aio_pika
import orjson
import psycopg
import pytest
import trustme

from cdc_relay.amqp import declare_exchange
from cdc_relay.config import Settings, option_of
from cdc_relay.errors import EX_CONFIG
from cdc_relay.pg.replication import ReplicationStream
from devtools.postgres import PostgresServer
from devtools.procs import free_port
from devtools.rabbit import RabbitServer
from devtools.tls import TlsFiles
from tests.fix_pg import ServerFactory
from tests.harness import Consumer, RelayProcess, Setup, run_cli, unique_names, wait_until

pytestmark = pytest.mark.integration

ROLE = "relay_role"
# Characters that must be percent-encoded in a URL, and that a careless log line would show.
PASSWORD = f"p#ss@w/rd-{uuid.uuid4().hex[:12]}"
ENCODED_PASSWORD = quote(PASSWORD, safe="")


def make_tls(directory: Path, hostnames: tuple[str, ...] = ("localhost",)) -> TlsFiles:
    """A CA, a server certificate for ``hostnames`` only, and a client certificate."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    server = ca.issue_cert(*hostnames)
    client = ca.issue_cert("cdc_relay@client.test", common_name="cdc_relay")
    files = TlsFiles(
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
        client_name="cdc_relay",
    )
    ca.cert_pem.write_to_path(str(files.ca))
    files.server_cert.write_bytes(b"".join(blob.bytes() for blob in server.cert_chain_pems))
    files.client_cert.write_bytes(b"".join(blob.bytes() for blob in client.cert_chain_pems))
    for key, leaf in ((files.server_key, server), (files.client_key, client)):
        key.touch(mode=0o600)
        leaf.private_key_pem.write_to_path(str(key))
    return files


class PasswordPostgres(PostgresServer):
    """The TLS-only server, plus: the relay's role must log in with its password."""

    def _hba(self) -> str:
        scram = (
            f"hostssl all {ROLE} 127.0.0.1/32 scram-sha-256\n"
            f"hostssl replication {ROLE} 127.0.0.1/32 scram-sha-256\n"
        )
        return scram + super()._hba()


@dataclass(frozen=True)
class Deployment:
    """The two TLS servers and the DSNs/URLs an operator would write."""

    tls: TlsFiles
    other_ca: Path
    pg: PostgresServer
    mq: RabbitServer

    def admin_dsn(self, host: str = "localhost", ca: Path | None = None) -> str:
        return (
            f"postgresql://postgres@{host}:{self.pg.port}/postgres"
            f"?sslmode=verify-full&sslrootcert={quote(str(ca or self.tls.ca))}"
        )

    def role_dsn(self, host: str = "localhost", ca: Path | None = None) -> str:
        return (
            f"postgresql://{ROLE}:{ENCODED_PASSWORD}@{host}:{self.pg.port}/postgres"
            f"?sslmode=verify-full&sslrootcert={quote(str(ca or self.tls.ca))}"
        )

    def amqp_url(self, host: str = "localhost", ca: Path | None = None) -> str:
        query = urlencode({"cacertfile": str(ca or self.tls.ca)})
        return f"amqps://guest:guest@{host}:{self.mq.port}/?{query}"

    def consumer_url(self) -> str:
        """aio-pika spells the CA parameter ``cafile``."""
        return f"amqps://guest:guest@localhost:{self.mq.port}/?cafile={quote(str(self.tls.ca))}"


@pytest.fixture(scope="module")
def deployment(
    tmp_path_factory: pytest.TempPathFactory,
    pg_factory: ServerFactory[PostgresServer],
    rabbit_factory: ServerFactory[RabbitServer],
) -> Deployment:
    base = tmp_path_factory.mktemp("tls-e2e")
    tls = make_tls(base / "pki")
    other = make_tls(base / "other-pki")
    pg = pg_factory.add(PasswordPostgres(ssl=tls))
    dep = Deployment(tls, other.ca, pg, rabbit_factory(tls=tls))
    with psycopg.connect(dep.admin_dsn(), autocommit=True) as conn:
        conn.execute(
            psycopg.sql.SQL("CREATE ROLE {} LOGIN REPLICATION PASSWORD {}").format(
                psycopg.sql.Identifier(ROLE), psycopg.sql.Literal(PASSWORD)
            )
        )
    return dep


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> tuple[int, str]:
    """Exit code and stdout+stderr (the secrets check reads both)."""
    result = run_cli(*args, env=env, timeout=timeout)
    return result.returncode, result.stdout + result.stderr


def assert_no_password(output: str) -> None:
    assert PASSWORD not in output, output
    assert ENCODED_PASSWORD not in output, output


def names_args(names: dict[str, str], command: str = "run") -> list[str]:
    """The naming options of ``names`` that ``command`` takes (each takes only its own)."""
    return [
        arg
        for key, value in names.items()
        if command in option_of(key).commands
        for arg in (f"--{key}", value)
    ]


@pytest.fixture
def outbox(deployment: Deployment) -> Iterator[Setup]:
    """An outbox initialised over TLS by the admin, granted to the relay's role."""
    setup = Setup(deployment.admin_dsn(), deployment.amqp_url(), unique_names("tls"))
    code, out = cli(
        "init",
        "--grant-to",
        ROLE,
        "--dsn",
        setup.dsn,
        "--amqp-url",
        setup.amqp_url,
        *names_args(setup.names),
    )
    assert code == 0, out
    assert f"granted to {ROLE}:" in out
    yield setup
    setup.cleanup()


def role_settings(deployment: Deployment, setup: Setup, amqp_url: str | None = None) -> Settings:
    return Settings(
        dsn=deployment.role_dsn(),
        amqp_urls=[amqp_url or deployment.amqp_url()],
        **setup.names,
    )


async def tls_consumer(relay_url: str, consumer_url: str, exchange: str) -> Consumer:
    """The exchange as the relay declares it, a queue bound to ``order.#`` only (a row of
    another aggregate type is unroutable), and a consumer on it. Two URLs: the relay
    spells the CA parameter ``cacertfile`` (RabbitMQ's convention), aio-pika ``cafile``."""
    await declare_exchange([relay_url], exchange)
    queue = f"q_{exchange}"
    connection = await aio_pika.connect(consumer_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, durable=True)
        await declared.bind(exchange, "order.#")
    return await Consumer(consumer_url, None, queue=queue).attach()


async def start_consumer(deployment: Deployment, setup: Setup) -> Consumer:
    exchange = setup.names["exchange"]
    return await tls_consumer(deployment.amqp_url(), deployment.consumer_url(), exchange)


def insert_rows(setup: Setup) -> tuple[list[str], str]:
    """Three routable rows and one no queue is bound for; as the admin (the app's role)."""
    with psycopg.connect(setup.dsn) as conn:
        good = setup.insert(conn, [{"aggregate_id": i, "payload": {"i": i}} for i in range(3)])
        (bad,) = setup.insert(conn, [{"aggregate_type": "nobody", "event_type": "Listens"}])
    return good, bad


@pytest.mark.asyncio
async def test_run_as_the_granted_role_over_tls(
    deployment: Deployment, outbox: Setup, tmp_path: Path
) -> None:
    settings = role_settings(deployment, outbox)
    consumer = await start_consumer(deployment, outbox)
    relay = RelayProcess(settings, tmp_path / "relay.log", metrics_port=free_port())
    relay.start()
    try:
        await relay.wait_ready(60)
        good, bad = insert_rows(outbox)
        await consumer.wait_for(set(good), timeout=30)
        as_role = ["--dsn", deployment.role_dsn(), *names_args(outbox.names, "dead-letters list")]
        as_status = ["--dsn", deployment.role_dsn(), *names_args(outbox.names, "status")]

        def stored() -> bool:
            code, out = cli("dead-letters", "list", "--json", *as_role)
            assert code == 0, out
            return bad in out

        assert await wait_until(stored, 30, 0.5), relay.log_tail()
        code, out = cli("dead-letters", "list", "--json", *as_role)
        (letter,) = [orjson.loads(line) for line in out.splitlines() if line.startswith("{")]
        assert letter["outbox_id"] == bad and "NO_ROUTE" in letter["reason"]
        code, out = cli("status", "--json", *as_status)
        assert code == 0, out
        state = orjson.loads(out)
        assert state["healthy"] is True and state["problems"] == []
        with psycopg.connect(outbox.dsn, autocommit=True) as conn:
            row = conn.execute(
                "SELECT s.ssl, a.usename FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)"
                " WHERE a.backend_type = 'walsender' AND a.usename = %s",
                (ROLE,),
            ).fetchone()
        assert row == (True, ROLE)
    finally:
        code = relay.stop()
        await consumer.close()
    assert code == 0, relay.log_tail()
    assert sorted(consumer.ids()) == sorted(good)
    assert_no_password(relay.log())


def wrong(deployment: Deployment, what: str) -> tuple[str, str, str]:
    """(dsn, amqp url, expected text) with one thing wrong about the TLS setup."""
    dsn, url = deployment.role_dsn(), deployment.amqp_url()
    if what == "pg-ca":
        return deployment.role_dsn(ca=deployment.other_ca), url, "certificate verify failed"
    if what == "pg-host":
        return deployment.role_dsn(host="127.0.0.1"), url, "does not match host name"
    if what == "mq-ca":
        return dsn, deployment.amqp_url(ca=deployment.other_ca), "certificate verify failed"
    assert what == "mq-host"
    return dsn, deployment.amqp_url(host="127.0.0.1"), "127.0.0.1"


@pytest.mark.parametrize("what", ["pg-ca", "pg-host", "mq-ca", "mq-host"])
def test_a_wrong_ca_or_host_name_is_one_line_and_exit_78(
    deployment: Deployment, outbox: Setup, what: str
) -> None:
    dsn, url, expected = wrong(deployment, what)
    names = names_args(outbox.names)
    code, out = cli("run", "--dsn", dsn, "--amqp-url", url, *names, timeout=90)
    lines = [line for line in out.splitlines() if "error" in line.lower()]
    assert code == EX_CONFIG, out
    assert len(lines) == 1 and lines[0].startswith("cdc-relay: error: "), out
    assert expected in lines[0], out
    assert_no_password(out)
    if what.startswith("pg"):  # the admin commands connect the same way
        for command in (["status"], ["dead-letters", "list"]):
            code, out = cli(*command, "--dsn", dsn, *names_args(outbox.names, " ".join(command)))
            assert code == EX_CONFIG, out
            assert expected in out and out.count("\n") == 1, out
            assert_no_password(out)


@pytest.mark.asyncio
async def test_file_secrets_and_json_logs(
    deployment: Deployment, outbox: Setup, tmp_path: Path
) -> None:
    """The role's DSN and the URL come from files (winning over the plain variables); every
    log line is one JSON object and none holds the password."""
    dsn_file, url_file = tmp_path / "dsn", tmp_path / "amqp_url"
    dsn_file.write_text(deployment.role_dsn() + "\n")
    url_file.write_text(deployment.amqp_url() + "\n")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CDC_RELAY_")},
        "PYTHONUNBUFFERED": "1",
        "CDC_RELAY_DSN_FILE": str(dsn_file),
        "CDC_RELAY_AMQP_URL_FILE": str(url_file),
        # Lose against the files: a plain-text relay to a closed port would never stream.
        "CDC_RELAY_DSN": f"postgresql://{ROLE}:{ENCODED_PASSWORD}@localhost:1/postgres",
        "CDC_RELAY_AMQP_URL": "amqp://guest:guest@localhost:1/",
        **{f"CDC_RELAY_{key.upper()}": value for key, value in outbox.names.items()},
    }
    consumer = await start_consumer(deployment, outbox)
    log_path = tmp_path / "relay.jsonl"
    port = free_port()
    args = ["--log-format", "json", "--log-level", "debug", "run", "--stats-interval", "0.5"]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cdc_relay.cli", *args, "--metrics-port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        from devtools.metrics import readyz

        assert await wait_until(lambda: readyz(port) == 200 or proc.poll() is not None, 60)
        assert proc.poll() is None, log_path.read_text()
        good, bad = insert_rows(outbox)
        await consumer.wait_for(set(good), timeout=30)
        await wait_until(lambda: bad in log_path.read_text(), 30)
        await asyncio.sleep(1.2)  # at least one stats line
    finally:
        proc.terminate()
        code = proc.wait(30)
        await consumer.close()
    text = log_path.read_text()
    assert code == 0, text
    assert_no_password(text)
    entries = [orjson.loads(line) for line in text.splitlines()]
    assert entries and all({"time", "level", "message"} <= set(e) for e in entries)
    messages = [e["message"] for e in entries]
    assert any(m.startswith("streaming from slot") for m in messages), messages
    assert any("msg/s confirmed" in m for m in messages), messages
    assert any(f"dead-lettered outbox row {bad}" in m for m in messages), messages


@pytest.mark.asyncio
async def test_client_certificate_login_to_rabbitmq(
    deployment: Deployment,
    outbox: Setup,
    tmp_path: Path,
    rabbit_factory: ServerFactory[RabbitServer],
) -> None:
    """``auth_mechanism=external``: the relay logs in with its certificate, no password."""
    tls = deployment.tls
    with rabbit_factory.running(tls=tls, external=True) as mq:
        assert "auth_mechanism=external" in mq.external_url and "@" not in mq.external_url
        query = urlencode(
            {
                "auth": "external",
                "cafile": str(tls.ca),
                "certfile": str(tls.client_cert),
                "keyfile": str(tls.client_key),
            }
        )
        consumer_url = f"amqps://localhost:{mq.port}/?{query}"
        consumer = await tls_consumer(mq.external_url, consumer_url, outbox.names["exchange"])
        settings = role_settings(deployment, outbox, amqp_url=mq.external_url)
        relay = RelayProcess(settings, tmp_path / "relay.log", metrics_port=free_port())
        relay.start()
        try:
            await relay.wait_ready(60)
            good, _ = insert_rows(outbox)
            await consumer.wait_for(set(good), timeout=30)
            users = mq.ctl(
                "list_connections", "user", "auth_mechanism", "ssl", "client_properties", "--quiet"
            )
            relay_rows = [line.split("\t") for line in users.splitlines() if "cdc-relay" in line]
            assert relay_rows, users
            assert all(row[:3] == [tls.client_name, "EXTERNAL", "true"] for row in relay_rows)
        finally:
            code = relay.stop()
            await consumer.close()
        assert code == 0, relay.log_tail()
        assert set(consumer.ids()) == set(good)


@pytest.mark.asyncio
async def test_replication_reads_batches_over_tls(deployment: Deployment, outbox: Setup) -> None:
    """libpq reads one TLS record per PQconsumeInput and the walsender sends one record per
    message: the stream must read on while the socket has more, not one frame per wakeup
    (which cost 4x the CPU per row, see docs/operations.md)."""
    with psycopg.connect(outbox.dsn) as conn:
        outbox.insert(conn, [{"aggregate_id": i} for i in range(500)])
    stream = await ReplicationStream.connect(deployment.role_dsn())
    sizes: list[int] = []
    try:
        assert stream._pgconn.ssl_in_use
        await stream.start(outbox.names["slot"], outbox.names["publication"])
        while sum(sizes) < 503:  # Begin, Relation, 500 Inserts, Commit (and keepalives)
            sizes.append(len(await asyncio.wait_for(stream.read_frames(), 30)))
    finally:
        await stream.close()
    assert sum(sizes) / len(sizes) > 4, sizes


@pytest.mark.asyncio
async def test_libpq_passfile_keeps_working(
    deployment: Deployment, outbox: Setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No password in the DSN: libpq finds it in ``passfile=`` or ``PGPASSFILE``."""
    passfile = tmp_path / "pgpass"
    passfile.touch(mode=0o600)
    passfile.write_text(f"localhost:{deployment.pg.port}:*:{ROLE}:{PASSWORD}\n")
    no_password = deployment.role_dsn().replace(f":{ENCODED_PASSWORD}@", "@")
    assert PASSWORD not in no_password and ENCODED_PASSWORD not in no_password
    with_param = f"{no_password}&passfile={quote(str(passfile))}"
    for command in (["status", "--no-require-active"], ["dead-letters", "list"]):
        names = names_args(outbox.names, " ".join(c for c in command if not c.startswith("-")))
        code, out = cli(*command, "--dsn", with_param, *names)
        assert code == 0, out
    names = names_args(outbox.names, "status")
    code, out = cli("status", "--no-require-active", "--dsn", no_password, *names)
    assert code == EX_CONFIG and "password" in out, out  # without it: refused, one line
    monkeypatch.setenv("PGPASSFILE", str(passfile))
    settings = Settings(dsn=no_password, amqp_urls=[deployment.amqp_url()], **outbox.names)
    relay = RelayProcess(settings, tmp_path / "relay.log", metrics_port=free_port()).start()
    try:
        await relay.wait_ready(60)
    finally:
        assert relay.stop() == 0, relay.log_tail()

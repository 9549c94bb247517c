"""The throwaway servers themselves: real processes, real crashes, no mocks.

The fault and integration suites rely on these guarantees (data survives a
crash, ports stay put across restarts, nothing outlives the test process), so
they are checked here directly. Servers are module-owned: these tests crash
them, which must not disturb the session-wide ones.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import aio_pika
import psycopg
import pytest
from pamqp.commands import Basic

from cdc_relay.config import Settings
from devtools.metrics import readyz
from devtools.procs import free_port, listen_addresses, pid_alive, port_open
from devtools.relayproc import RelayProcess, cli_args
from devtools.servers import PostgresServer, RabbitServer
from tests.fix_pg import ServerFactory


def wait_for(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def test_free_port_is_bindable_on_loopback() -> None:
    port = free_port()
    assert 0 < port < 65536
    assert not port_open(port)


def test_servers_refuse_to_start_in_a_unit_test_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """``make test-unit`` sets DEVTOOLS_FORBID_SERVERS: an unmarked server test fails there."""
    monkeypatch.setenv("DEVTOOLS_FORBID_SERVERS", "1")
    for server in (PostgresServer(), RabbitServer()):
        try:
            with pytest.raises(RuntimeError, match="mark the test `integration`"):
                server.start()
            assert not server.is_running()
        finally:
            server.cleanup()


def test_server_factory_removes_a_server_that_failed_to_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A start that fails leaves no directory, and close() removes the rest."""
    monkeypatch.setenv("DEVTOOLS_FORBID_SERVERS", "1")
    factory = ServerFactory(PostgresServer)
    failed = PostgresServer()
    with pytest.raises(RuntimeError, match="mark the test `integration`"):
        factory.add(failed)
    assert not failed.base_dir.exists()
    built = factory(start=False)
    assert built.base_dir.is_dir()
    factory.close()
    assert not built.base_dir.exists()


def test_relay_process_arguments_cover_every_broker_url(tmp_path: Path) -> None:
    settings = Settings(dsn="postgresql://x@h/db", amqp_urls=["amqp://a/", "amqp://b/"])
    args = cli_args(settings)
    assert args[:6] == [
        "--dsn",
        "postgresql://x@h/db",
        "--amqp-url",
        "amqp://a/",
        "--amqp-url",
        "amqp://b/",
    ]
    relay = RelayProcess(settings, tmp_path / "log", "--stats-interval", "1", metrics_port=1234)
    full = relay.args()
    assert full[full.index("--metrics-port") + 1] == "1234"
    # Extra options come last, so they override the wrapper's defaults.
    assert full[-2:] == ["--stats-interval", "1"]
    # The log level is the group's, before the subcommand.
    assert full.index("--log-level") < full.index("run")


def test_readyz_is_zero_when_nothing_listens() -> None:
    assert readyz(free_port()) == 0


# --------------------------------------------------------------------------- Postgres


@pytest.fixture(scope="module")
def pg(pg_factory: ServerFactory[PostgresServer]) -> PostgresServer:
    return pg_factory()


def fetch_notes(dsn: str) -> list[str]:
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        return [row[0] for row in conn.execute("SELECT note FROM crash_test ORDER BY id")]


def test_pg_is_logical_and_accepts_replication_connections(pg: PostgresServer) -> None:
    with psycopg.connect(pg.dsn, autocommit=True) as conn:
        assert conn.execute("SHOW wal_level").fetchone() == ("logical",)
        assert conn.execute("SHOW listen_addresses").fetchone() == ("127.0.0.1",)
        (sockets,) = conn.execute("SHOW unix_socket_directories").fetchone() or ("",)
        assert sockets.startswith(str(pg.base_dir))
    with psycopg.connect(pg.dsn, replication="database", autocommit=True) as repl:
        row = repl.execute("IDENTIFY_SYSTEM").fetchone()
    assert row is not None
    systemid, timeline, xlogpos, dbname = row
    assert int(systemid) > 0 and int(timeline) >= 1 and "/" in xlogpos
    assert dbname == "postgres"
    assert listen_addresses(pg.port) == {"127.0.0.1"}
    assert pg.dsn == f"postgresql://postgres@127.0.0.1:{pg.port}/postgres"


def test_pg_data_survives_immediate_stop(pg: PostgresServer) -> None:
    with psycopg.connect(pg.dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE crash_test (id int PRIMARY KEY, note text)")
        conn.execute("INSERT INTO crash_test VALUES (1, 'before immediate stop')")
    pg.stop("immediate")
    assert not pg.is_running()
    assert not port_open(pg.port)
    pg.start()
    assert fetch_notes(pg.dsn) == ["before immediate stop"]
    assert "automatic recovery in progress" in pg.log_tail(200)


def test_pg_data_survives_kill_of_every_process(pg: PostgresServer) -> None:
    port = pg.port
    held = psycopg.connect(pg.dsn, autocommit=True)  # a client caught by the crash
    try:
        held.execute("INSERT INTO crash_test VALUES (2, 'before kill')")
        pids = [r[0] for r in held.execute("SELECT pid FROM pg_stat_get_activity(NULL)")]
        assert len(pids) >= 3  # our backend and the auxiliary processes
        pg.kill()
        assert not pg.is_running()
        assert not any(pid_alive(pid) for pid in pids)
    finally:
        held.close()
    pg.start()
    assert pg.port == port
    assert fetch_notes(pg.dsn) == ["before immediate stop", "before kill"]


def test_pg_restart_keeps_port_and_applies_changed_settings(pg: PostgresServer) -> None:
    port = pg.port
    pg.settings["work_mem"] = "7MB"
    pg.restart()
    assert pg.port == port
    with psycopg.connect(pg.dsn, autocommit=True) as conn:
        assert conn.execute("SHOW work_mem").fetchone() == ("7MB",)


def test_pg_start_failure_raises_with_server_log(
    pg_factory: ServerFactory[PostgresServer],
) -> None:
    server = pg_factory(settings={"shared_buffers": "lots"}, start=False)
    with pytest.raises(RuntimeError, match="shared_buffers"):
        server.start(timeout=20)
    assert not server.is_running()


def test_pg_context_manager_leaves_nothing_behind() -> None:
    with PostgresServer() as server:
        base_dir = server.base_dir
        pid = int((server.data_dir / "postmaster.pid").read_text().split()[0])
        assert server.is_running()
    assert not pid_alive(pid)
    assert not base_dir.exists()


def test_servers_do_not_outlive_a_killed_python_process() -> None:
    """SIGKILL skips atexit: the watchdog must still stop the server."""
    script = textwrap.dedent(
        """
        import os, signal
        from devtools.servers import PostgresServer
        server = PostgresServer()
        server.start()
        pid = (server.data_dir / "postmaster.pid").read_text().split()[0]
        print(server.base_dir, pid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env
    )
    assert result.returncode == -9, result.stderr
    base_dir, pid = result.stdout.split()
    wait_for(lambda: not pid_alive(int(pid)), 15, "the orphaned postmaster to die")
    wait_for(lambda: not Path(base_dir).exists(), 15, "the temp dir to be removed")


@pytest.mark.integration
def test_pg_cleanup_kills_a_postmaster_missing_from_the_pid_file(
    pg_factory: ServerFactory[PostgresServer],
) -> None:
    """A postmaster whose pid file is not (yet) readable, as when pg_ctl is killed
    mid-start, must not outlive cleanup() while its directory is removed."""
    server = pg_factory()
    try:
        pid_file = server.data_dir / "postmaster.pid"
        pid = int(pid_file.read_text().split()[0])
        pid_file.rename(server.base_dir / "postmaster.pid.hidden")
        assert not server.is_running()
    finally:
        server.cleanup()
    assert not server.base_dir.exists()
    wait_for(lambda: not pid_alive(pid), 5, "the hidden postmaster to die")


@pytest.mark.integration
def test_sigterm_to_devtools_servers_stops_both_servers() -> None:
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "devtools.servers"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=root,
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        while line and "# up in" not in line:
            line = proc.stderr.readline()
        assert "# up in" in line, line
        pg_dir = Path(line.split("postgres in ")[1].split(",")[0])
        mq_dir = Path(line.split(" in ")[-1].split(")")[0])
        postmaster = int((pg_dir / "data" / "postmaster.pid").read_text().split()[0])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert not pid_alive(postmaster)
    assert not pg_dir.exists() and not mq_dir.exists()


# --------------------------------------------------------------------------- RabbitMQ


@pytest.fixture(scope="module")
def mq(rabbit_factory: ServerFactory[RabbitServer]) -> RabbitServer:
    return rabbit_factory()


async def publish_persistent(url: str, queue_name: str, body: bytes) -> None:
    connection = await aio_pika.connect(url, timeout=10)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.declare_queue(queue_name, durable=True)
        confirmation = await channel.default_exchange.publish(
            aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=queue_name,
            mandatory=True,
        )
        assert isinstance(confirmation, Basic.Ack)


async def get_all(url: str, queue_name: str) -> list[bytes]:
    """Take every message from the queue (it must exist: passive declare)."""
    connection = await aio_pika.connect(url, timeout=10)
    bodies: list[bytes] = []
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, durable=True, passive=True)
        while (message := await queue.get(timeout=5, fail=False)) is not None:
            bodies.append(message.body)
            await message.ack()
    return bodies


def test_rabbit_is_private_and_loopback_only(mq: RabbitServer) -> None:
    assert mq.amqp_url == f"amqp://guest:guest@127.0.0.1:{mq.port}/"
    assert mq.port not in (5672, 25672) and mq.dist_port not in (5672, 25672)
    assert listen_addresses(mq.port) == {"127.0.0.1"}
    assert listen_addresses(mq.dist_port) == {"127.0.0.1"}
    status = mq.ctl("status")
    assert mq.nodename in status
    with pytest.raises(RuntimeError, match="no_such_command"):
        mq.ctl("no_such_command", timeout=30)


@pytest.mark.asyncio
async def test_rabbit_durable_data_survives_clean_stop_and_kill(mq: RabbitServer) -> None:
    """Clean stop/start, then kill -9/start: confirmed persistent messages stay.

    The queue is declared before the clean stop on purpose: RabbitMQ 3.10 can
    lose a queue *declaration* made a moment before a kill -9 (seen ~1 in 10
    under load, 0.1 s after declaring), taking its confirmed messages with it.
    """
    queue_name = f"devservers-{uuid.uuid4().hex[:8]}"
    url = mq.amqp_url
    await publish_persistent(url, queue_name, b"before clean stop")
    await asyncio.to_thread(mq.stop)
    assert not mq.is_running()
    await asyncio.to_thread(mq.start)
    assert mq.amqp_url == url
    assert f"{queue_name}\t1" in mq.ctl("list_queues", "name", "messages", "--quiet")

    await publish_persistent(url, queue_name, b"before kill -9")
    await asyncio.to_thread(mq.kill)
    assert not mq.is_running()
    assert not port_open(mq.port)
    await asyncio.to_thread(mq.start)
    assert await get_all(url, queue_name) == [b"before clean stop", b"before kill -9"], (
        mq.log_tail()
    )

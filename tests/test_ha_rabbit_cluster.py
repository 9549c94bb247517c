"""Issue 11: the relay survives losing the RabbitMQ node it publishes through.

Three private clustered nodes, a quorum queue (three members) bound to the
exchange, and the relay given a silent address first (accepts TCP, never
answers the AMQP handshake) and then every node. The node the relay is
connected to is killed with SIGKILL mid-stream, started again, and then the
next one is killed: every committed row must be read from the surviving
majority. The failover times (kill -> the relay streaming through another node)
are printed; run with ``-s`` to see them.
"""

from __future__ import annotations

import asyncio
import re
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.cluster import RabbitCluster
from devtools.rabbit import RabbitServer
from tests.faults import Workload, verify
from tests.harness import Consumer, RelayProcess, Setup, unique_names

pytestmark = [pytest.mark.asyncio, pytest.mark.integration]

QUORUM = {"x-queue-type": "quorum", "x-quorum-initial-group-size": 3}
STREAMING = re.compile(r"streaming from slot \S+ .* to amqp://[^@\s]*@[^:\s]+:(\d+)/")
# A kill is followed by one failed session, a backoff (--reconnect-min 0.5 s,
# full jitter) and a new session; with the silent address tried first, the
# handshake timeout (10 s) is added once.
FAILOVER_BOUND = 20.0


@pytest.fixture
def silent_url() -> Iterator[str]:
    """An address that completes TCP (the kernel's backlog) but never says a word."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    try:
        yield f"amqp://guest:guest@127.0.0.1:{sock.getsockname()[1]}/"
    finally:
        sock.close()


def connected_ports(relay: RelayProcess) -> list[int]:
    """The broker port of every session the relay started, in order."""
    return [int(m.group(1)) for m in STREAMING.finditer(relay.log())]


async def wait_for_session(relay: RelayProcess, count: int, timeout: float) -> int:
    """Wait until the relay has started its ``count``-th session; that session's port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        relay.check_alive()
        ports = connected_ports(relay)
        if len(ports) >= count:
            return ports[count - 1]
        await asyncio.sleep(0.05)
    raise AssertionError(f"no session #{count} within {timeout}s:\n{relay.log_tail(4000)}")


def node_on(cluster: RabbitCluster, port: int) -> RabbitServer:
    return next(node for node in cluster.nodes if node.port == port)


async def test_killing_the_connected_node_twice_loses_nothing(
    rabbit_cluster: RabbitCluster, pg_dsn: str, silent_url: str, tmp_path: Path
) -> None:
    setup = Setup(pg_dsn, rabbit_cluster.amqp_urls[0], unique_names("harmq"))
    setup.settings.amqp_urls = [silent_url, *rabbit_cluster.amqp_urls]
    setup.init()
    queue = f"q_{setup.names['exchange']}"
    declarer = await Consumer(rabbit_cluster.amqp_urls[0], setup.names["exchange"]).start(QUORUM)
    await declarer.close()
    # `init` with the silent address first still reaches a node (each URL in turn).
    init = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cdc_relay.cli",
        "init",
        *setup.cli_args(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    relay = RelayProcess(setup, tmp_path / "relay.log", log_level="INFO").start()
    consumer: Consumer | None = None
    try:
        first_port = await wait_for_session(relay, 1, 30)
        workload = Workload(setup, total_rows=6000, rows_per_second=400, max_seconds=60).start()
        failovers: list[float] = []
        killed: list[RabbitServer] = []
        for round_ in (1, 2):
            await asyncio.sleep(2)  # mid-stream
            port = connected_ports(relay)[-1]
            victim = node_on(rabbit_cluster, port)
            began = time.monotonic()
            await asyncio.to_thread(victim.kill)
            new_port = await wait_for_session(relay, round_ + 1, FAILOVER_BOUND + 10)
            failovers.append(time.monotonic() - began)
            assert new_port != port, "the relay reconnected to the node that was killed"
            killed.append(victim)
            if round_ == 1:
                await asyncio.to_thread(victim.start)  # rejoins the cluster by itself
        await workload.wait(120)
        out, _ = await asyncio.wait_for(init.communicate(), 60)
        assert init.returncode == 0, out.decode()
        assert f"exchange {setup.names['exchange']}: already exists" in out.decode()

        survivor = next(node for node in rabbit_cluster.nodes if node is not killed[-1])
        consumer = await Consumer(survivor.amqp_url, None, queue=queue).attach()
        verdict = await verify(setup, consumer, timeout=90)
        print(
            f"\nrabbitmq cluster: first node port {first_port}; failover after kill -9 "
            f"(kill -> streaming via another node): "
            + ", ".join(f"{t:.2f}s" for t in failovers)
            + f"; {verdict.row('two node kills')}"
        )
        assert verdict.lost == 0
        assert all(t < FAILOVER_BOUND for t in failovers), failovers
        relay.check_alive()
    finally:
        if consumer is not None:
            await consumer.close()
        relay.stop_quietly()
        if init.returncode is None:
            init.kill()
            await init.wait()
        for node in rabbit_cluster.nodes:
            if not node.is_running():
                await asyncio.to_thread(node.start)
        setup.cleanup()

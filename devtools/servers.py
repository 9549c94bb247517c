"""Throwaway Postgres and RabbitMQ servers for the demo, the tests and the benchmark.

``python -m devtools.servers`` starts both for manual experiments and prints
the environment variables that point the relay and the tests at them.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from typing import Any

from devtools.postgres import PostgresServer, pg_bindir
from devtools.procs import free_port
from devtools.rabbit import RabbitServer

__all__ = ["PostgresServer", "RabbitServer", "free_port", "pg_bindir"]


def main() -> None:
    """Start both servers, print where they are, wait for Ctrl-C or SIGTERM."""
    done = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        done.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    began = time.monotonic()
    with PostgresServer() as pg, RabbitServer() as mq:
        print(f"export CDC_RELAY_DSN={pg.dsn}")
        print(f"export CDC_RELAY_AMQP_URL={mq.amqp_url}")
        print(f"export CDC_RELAY_TEST_DSN={pg.dsn}")
        print(f"export CDC_RELAY_TEST_AMQP_URL={mq.amqp_url}", flush=True)
        print(
            f"# up in {time.monotonic() - began:.1f}s (postgres in {pg.base_dir}, "
            f"rabbitmq node {mq.nodename} in {mq.base_dir}); Ctrl-C stops and removes them",
            file=sys.stderr,
            flush=True,
        )
        while not done.wait(0.5):
            if not pg.is_running() or not mq.is_running():
                print("# a server went away; cleaning up", file=sys.stderr, flush=True)
                break


if __name__ == "__main__":
    main()

"""A throwaway RabbitMQ cluster of private nodes on one machine (issue 11: HA).

Each node is a ``RabbitServer`` with its own ports, directories and node name;
they share an Erlang cookie, and nodes 2..N join node 1 (``stop_app``,
``reset``, ``join_cluster``, ``start_app``). Booting the nodes in parallel and
joining them takes about 30 s for three on 2 cores. A node that is killed and
started again on the same directories rejoins by itself.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from devtools.procs import ServerGroup
from devtools.rabbit import RabbitServer

__all__ = ["RabbitCluster"]


class RabbitCluster(ServerGroup):
    """``size`` clustered nodes; ``nodes[0]`` is the one the others joined."""

    PREFIX = "cdc-relay-mqc-"

    def __init__(self, size: int = 3, base_dir: Path | None = None) -> None:
        if size < 1:
            raise ValueError("a cluster needs at least one node")
        self._init_dir(base_dir)
        cookie = uuid.uuid4().hex.upper()
        self.nodes: list[RabbitServer] = [
            RabbitServer(self.base_dir / f"node{i + 1}", cookie=cookie) for i in range(size)
        ]

    @property
    def amqp_urls(self) -> list[str]:
        """Every node's URL, as the relay takes them (``--amqp-url`` repeated)."""
        return [node.amqp_url for node in self.nodes]

    def start(self, timeout: float = 120) -> None:
        """Boot every node at once, then join nodes 2..N to node 1 (first start only)."""
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            for future in [pool.submit(node.start, timeout) for node in self.nodes]:
                future.result()
        first = self.nodes[0].nodename
        for node in self.nodes[1:]:
            if first in self.running_nodes(node):
                continue  # joined on an earlier start
            node.ctl("stop_app", timeout=timeout)
            node.ctl("reset", timeout=timeout)
            node.ctl("join_cluster", first, timeout=timeout)
            node.ctl("start_app", timeout=timeout)
            node.ctl("await_startup", timeout=timeout)

    @staticmethod
    def running_nodes(node: RabbitServer) -> list[str]:
        """The cluster's running nodes as ``node`` sees them."""
        out = node.ctl("eval", "rabbit_nodes:all_running().", timeout=30)
        return [name.strip(" '[]\n") for name in out.split(",") if name.strip(" '[]\n")]

    def members(self) -> Iterable[RabbitServer]:
        return self.nodes

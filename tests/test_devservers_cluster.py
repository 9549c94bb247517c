"""A three-node RabbitMQ cluster (issue 11): boots, joins, and replicates a quorum queue."""

from __future__ import annotations

import aio_pika
import pytest
from pamqp.commands import Basic

from devtools.cluster import RabbitCluster


@pytest.mark.asyncio
@pytest.mark.timeout(240)
async def test_three_node_cluster_replicates_a_quorum_queue(
    rabbit_cluster: RabbitCluster,
) -> None:
    cluster = rabbit_cluster
    names = sorted(node.nodename for node in cluster.nodes)
    for node in cluster.nodes:
        assert sorted(RabbitCluster.running_nodes(node)) == names
    assert len(set(cluster.amqp_urls)) == 3
    # Publish through node 1 into a quorum queue on all three, read it through node 3.
    first, last = cluster.amqp_urls[0], cluster.amqp_urls[-1]
    connection = await aio_pika.connect(first, timeout=10)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        arguments = {"x-queue-type": "quorum", "x-quorum-initial-group-size": 3}
        queue = await channel.declare_queue("ha", durable=True, arguments=arguments)
        confirm = await channel.default_exchange.publish(
            aio_pika.Message(b"replicated", delivery_mode=2), queue.name
        )
        assert isinstance(confirm, Basic.Ack)
    members = cluster.nodes[0].ctl("list_queues", "name", "members", "--quiet")
    assert all(name in members for name in names), members
    connection = await aio_pika.connect(last, timeout=10)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue("ha", passive=True)
        message = await queue.get(timeout=10)
        assert message.body == b"replicated"
        await message.ack()

"""cdc-relay: a transactional-outbox relay from Postgres logical replication to RabbitMQ."""

__version__ = "0.1.0"

"""cdc-relay: a transactional-outbox relay from Postgres logical replication to RabbitMQ."""

from cdc_relay import accel as _accel

__version__ = "0.1.0"

_accel.install()  # before any hot-path module is imported: see cdc_relay/accel.py

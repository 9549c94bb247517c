"""Relay settings shared by the CLI, the admin commands and the relay."""

from __future__ import annotations

from dataclasses import dataclass, field

EX_CONFIG = 78  # sysexits.h: configuration error


class ConfigError(Exception):
    """A misconfiguration: one line saying what is wrong and how to fix it."""

    exit_code = EX_CONFIG


def split_table_name(name: str) -> tuple[str, str]:
    """``schema.table`` (or ``table``, meaning public) -> (schema, table)."""
    schema, sep, table = name.partition(".")
    if not sep:
        schema, table = "public", name
    if not schema or not table or "." in table:
        raise ConfigError(f"invalid --table {name!r}: use schema.table, e.g. public.outbox")
    return schema, table


class FatalError(ConfigError):
    """Something retrying cannot fix that is not a setting (e.g. undecodable WAL data)."""

    exit_code = 70  # sysexits.h: internal software error


# A classic queue confirms persistent messages per fsync batch: the window must
# cover a batch or two at full speed (measured in docs/performance.md).
DEFAULT_MAX_IN_FLIGHT = 4000


@dataclass(slots=True)
class Settings:
    dsn: str = "postgresql://postgres@localhost:5432/postgres"
    amqp_urls: list[str] = field(default_factory=lambda: ["amqp://guest:guest@localhost:5672/"])
    slot: str = "cdc_relay"
    publication: str = "cdc_relay_outbox"
    table: str = "public.outbox"
    exchange: str = "outbox"
    routing_key: str = "{aggregate_type}.{event_type}"
    message_format: str = "event"
    declare_exchange: bool = True
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    status_interval: float = 1.0
    confirm_timeout: float = 30.0
    shutdown_timeout: float = 10.0
    reconnect_min: float = 0.5
    reconnect_max: float = 30.0
    tcp_keepalive_idle: int = 10
    tcp_keepalive_interval: int = 5
    tcp_keepalive_count: int = 3
    amqp_heartbeat: int = 10
    pg_timeout: float = 30.0
    on_unroutable: str = "deadletter"
    max_message_size: int = 128 * 1024 * 1024
    stats_interval: float = 10.0

    @property
    def table_parts(self) -> tuple[str, str]:
        return split_table_name(self.table)

    @property
    def dead_letter_table(self) -> tuple[str, str]:
        schema, table = self.table_parts
        return schema, f"{table}_dead_letter"

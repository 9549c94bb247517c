"""Relay settings: every default, range and help text exists here once.

The ``cdc-relay`` command line is generated from the field metadata below
(``cdc_relay.cli``), so a default cannot drift between the CLI and code that
builds ``Settings`` directly (tests, bench). ``Settings.check`` applies the same
ranges to values that did not come through the CLI.
"""

from __future__ import annotations

import getpass
import math
import os
import re
from dataclasses import dataclass, field, fields
from datetime import timedelta
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from cdc_relay.cloudevents import check_source, default_source
from cdc_relay.errors import EX_CONFIG, ConfigError, FatalError, RelayError
from cdc_relay.layout import LAYOUTS, build_layout
from cdc_relay.router import DEFAULT_EXCHANGE_PATTERN, FORMATS, exchange_allowed
from cdc_relay.schema import split_table_name

__all__ = [
    "DEFAULT_MAX_IN_FLIGHT",
    "EX_CONFIG",
    "SECTIONS",
    "ConfigError",
    "FatalError",
    "Option",
    "RelayError",
    "Settings",
    "option_of",
    "split_table_name",
]

MIN_RETENTION = timedelta(minutes=1)

# A classic queue confirms persistent messages per fsync batch: the window must
# cover a batch or two at full speed (measured in docs/performance.md).
DEFAULT_MAX_IN_FLIGHT = 4000
DEFAULT_MESSAGE_PREFIX = "cdc_relay"  # of the messages <table>_emit writes and run publishes
MiB = 1024 * 1024
# Postgres' own rule for slot names (ReplicationSlotValidateName).
SLOT_NAME = re.compile(r"[a-z0-9_]{1,63}")
# RabbitMQ refuses bodies above 512 MiB whatever max_message_size says.
BROKER_MAX_MESSAGE_SIZE = 512 * MiB


# The commands, by the name `settings_options` knows them; GROUP is `cdc-relay`
# itself (its options come before the subcommand and hold for every one).
GROUP = "cdc-relay"
INIT, RUN, STATUS, DROP, PRUNE, RESYNC = "init", "run", "status", "drop", "prune", "resync"
DL_LIST, DL_REPLAY, DL_PRUNE = "dead-letters list", "dead-letters replay", "dead-letters prune"
COMMANDS = (INIT, RUN, STATUS, DROP, PRUNE, RESYNC, DL_LIST, DL_REPLAY, DL_PRUNE)
_EVERY = frozenset(COMMANDS)
# Every command that publishes, so one policy applies to all three.
_PUBLISH = frozenset({RUN, RESYNC, DL_REPLAY})
_STREAM = frozenset({RUN, RESYNC})  # read the slot's rows and publish them
_RUN = frozenset({RUN})
_AMQP = frozenset({INIT, RUN, RESYNC, DL_REPLAY})  # connect to RabbitMQ
_SLOT = frozenset({INIT, RUN, STATUS, DROP, RESYNC})  # the slot and its publication
# Read outbox rows (or validate the table they are read from): the column mapping.
_ROWS = frozenset({INIT, RUN, STATUS, PRUNE, RESYNC, DL_REPLAY})

# The help sections of `run --help`, in order.
CONNECTIONS, MAPPING, FLOW, TIMEOUTS, OBSERVABILITY = (
    "Connections",
    "Mapping",
    "Flow control",
    "Timeouts",
    "Observability",
)
SECTIONS = (CONNECTIONS, MAPPING, FLOW, TIMEOUTS, OBSERVABILITY)


@dataclass(frozen=True, slots=True)
class Option:
    """How one setting appears on the command line and in the environment.

    ``commands`` are the commands that use the setting and so show and accept
    it (``GROUP``: an option of ``cdc-relay`` itself); ``section`` is its help
    heading. ``value_type`` is only needed when the default (None) does not tell it.
    """

    help: str
    commands: frozenset[str] = _RUN
    section: str = TIMEOUTS
    flag: str | None = None
    env: str | None = None
    min: float | None = None
    max: float | None = None
    choices: tuple[str, ...] = ()
    secret: bool = False
    file_env: str | None = None
    value_type: type | None = None
    metavar: str | None = None

    def flag_for(self, name: str) -> str:
        return self.flag or "--" + name.replace("_", "-")

    def env_for(self, name: str) -> str:
        return self.env or "CDC_RELAY_" + name.upper()

    def check(self, label: str, value: Any) -> None:
        """Raise ValueError (one line) if ``value`` is outside this option's domain."""
        if value is None or isinstance(value, bool):
            return
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{label} must be a finite number, not {value}")
        if isinstance(value, int | float):
            if self.min is not None and value < self.min:
                raise ValueError(f"{label} must be at least {_num(self.min)}, not {_num(value)}")
            if self.max is not None and value > self.max:
                raise ValueError(f"{label} must be at most {_num(self.max)}, not {_num(value)}")
        if self.choices and isinstance(value, str) and value not in self.choices:
            raise ValueError(f"{label} must be one of {', '.join(self.choices)}, not {value!r}")


def _num(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def setting(default: Any, opt: Option) -> Any:
    """A dataclass field with an immutable default, carrying its CLI option."""
    return field(default=default, metadata={"cli": opt})


_SECONDS = 86_400.0  # no timeout or interval above a day is a sensible setting


@dataclass(slots=True)
class Settings:
    """What one relay (and the admin commands) needs to know; read by ``Relay``."""

    # -- every command -------------------------------------------------------------
    dsn: str = setting(
        "postgresql://postgres@localhost:5432/postgres",
        Option(
            "Postgres connection string (libpq keywords or URI; the primary).",
            commands=_EVERY,
            section=CONNECTIONS,
            secret=True,
            file_env="CDC_RELAY_DSN_FILE",
        ),
    )
    amqp_urls: list[str] = field(
        default_factory=lambda: ["amqp://guest:guest@localhost:5672/"],
        metadata={
            "cli": Option(
                "RabbitMQ URL; repeat (or comma-separate) for cluster nodes.",
                commands=_AMQP,
                section=CONNECTIONS,
                flag="--amqp-url",
                env="CDC_RELAY_AMQP_URL",
                secret=True,
                file_env="CDC_RELAY_AMQP_URL_FILE",
            )
        },
    )
    slot: str = setting(
        "cdc_relay", Option("Logical replication slot.", commands=_SLOT, section=CONNECTIONS)
    )
    publication: str = setting(
        "cdc_relay_outbox",
        Option("Publication covering the outbox table.", commands=_SLOT, section=CONNECTIONS),
    )
    table: str = setting(
        "public.outbox",
        Option(
            "The outbox table (schema.table).",
            commands=_EVERY,
            section=CONNECTIONS,
        ),
    )
    exchange: str = setting(
        "outbox",
        Option("Exchange for rows without their own exchange.", commands=_AMQP, section=MAPPING),
    )
    routing_key: str = setting(
        "{aggregate_type}.{event_type}",
        Option(
            "Routing-key template for rows without their own routing_key.",
            commands=_PUBLISH,
            section=MAPPING,
        ),
    )
    message_format: str = setting(
        "event",
        Option(
            "event: the payload as a JSON event; celery: a Celery task message; "
            "cloudevents: a CloudEvent in binary mode (ce- headers, the payload as the body); "
            "cloudevents-structured: the whole CloudEvent as application/cloudevents+json.",
            commands=_AMQP,
            section=MAPPING,
            flag="--format",
            env="CDC_RELAY_FORMAT",
            choices=FORMATS,
        ),
    )
    ce_source: str | None = setting(
        None,
        Option(
            "The CloudEvents source of --format cloudevents and cloudevents-structured "
            "(default: /cdc-relay/<database>/<schema>.<table>, the database the DSN names).",
            commands=_PUBLISH,
            section=MAPPING,
            value_type=str,
            metavar="URI",
        ),
    )
    layout: str = setting(
        "cdc-relay",
        Option(
            "The outbox's columns: cdc-relay (init's table) or debezium (Debezium's Outbox "
            "Event Router: id, aggregatetype, aggregateid, type, payload, timestamp, "
            "tracingspancontext).",
            commands=_ROWS,
            section=MAPPING,
            choices=LAYOUTS,
        ),
    )
    column: list[str] = field(
        default_factory=list,
        metadata={
            "cli": Option(
                "FIELD=COLUMN: read a field (id, aggregate_type, aggregate_id, event_type, "
                "payload, headers, exchange, routing_key, created_at, trace_context, or an "
                "AMQP property such as correlation_id) from this column; repeatable.",
                commands=_ROWS,
                section=MAPPING,
                metavar="FIELD=COLUMN",
            )
        },
    )
    header_column: list[str] = field(
        default_factory=list,
        metadata={
            "cli": Option(
                "COLUMN[:HEADER]: put this column's value into an AMQP header (named like "
                "the column by default); repeatable.",
                commands=_ROWS,
                section=MAPPING,
                metavar="COLUMN[:HEADER]",
            )
        },
    )
    # -- run -------------------------------------------------------------------------
    declare_exchange: bool = setting(
        True,
        Option(
            "Declare the default exchange at start (--no-declare: it must exist).",
            commands=_STREAM,
            section=MAPPING,
            flag="--declare/--no-declare",
            env="CDC_RELAY_DECLARE",
        ),
    )
    max_in_flight: int = setting(
        DEFAULT_MAX_IN_FLIGHT,
        Option(
            "Unconfirmed publishes allowed at once (also the most a crash can replay).",
            commands=_STREAM,
            section=FLOW,
            min=1,
            max=100_000,
        ),
    )
    max_in_flight_bytes: int = setting(
        64 * MiB,
        Option(
            "Bytes of unconfirmed message bodies allowed at once.",
            commands=_PUBLISH,
            section=FLOW,
            min=1,
            max=2**40,
        ),
    )
    retention: timedelta | None = setting(  # noqa: RUF009 (setting() is a field())
        None,
        Option(
            "Delete outbox rows older than this in the background, in small batches "
            "(e.g. 7d; keep rows as long as you may need `resync --since`). Off by default.",
            section=FLOW,
            value_type=timedelta,
            metavar="DURATION",
        ),
    )
    message_prefix: str = setting(
        DEFAULT_MESSAGE_PREFIX,
        Option(
            "Prefix of the outbox_emit messages: init writes it into <table>_emit, run "
            "publishes the messages that carry it. One per outbox of a database.",
            commands=frozenset({INIT, RUN, STATUS}),
            section=MAPPING,
        ),
    )
    status_interval: float = setting(
        1.0, Option("Seconds between standby status updates to Postgres.", min=0.05, max=30)
    )
    confirm_timeout: float = setting(
        30.0,
        Option(
            "Seconds to wait for a broker confirm before ending the session.",
            commands=_PUBLISH,
            min=0.1,
        ),
    )
    shutdown_timeout: float = setting(
        10.0, Option("On SIGTERM, seconds to wait for outstanding confirms.", min=0, max=3600)
    )
    reconnect_min: float = setting(
        0.5,
        Option("Shortest pause before reconnecting, in seconds.", section=FLOW, min=0.01, max=3600),
    )
    reconnect_max: float = setting(
        30.0,
        Option("Longest pause before reconnecting, in seconds.", section=FLOW, min=0.01, max=3600),
    )
    tcp_keepalive_idle: int = setting(
        10, Option("Seconds of silence before probing the Postgres connection.", min=1, max=32767)
    )
    tcp_keepalive_interval: int = setting(
        5, Option("Seconds between TCP keepalive probes.", min=1, max=32767)
    )
    tcp_keepalive_count: int = setting(
        3, Option("Unanswered probes before the connection is dead.", min=1, max=127)
    )
    amqp_heartbeat: int = setting(
        10,
        Option(
            "AMQP heartbeat in seconds (0: off).",
            commands=_PUBLISH,
            flag="--heartbeat",
            env="CDC_RELAY_HEARTBEAT",
            min=0,
            max=65535,
        ),
    )
    amqp_connect_timeout: float = setting(
        10.0,
        Option(
            "Seconds to connect to one RabbitMQ node and finish the AMQP handshake "
            "before trying the next (a node that accepts TCP and never answers).",
            min=0.1,
            max=300,
            commands=_AMQP,
        ),
    )
    pg_timeout: float = setting(
        30.0,
        Option(
            "Seconds without any data from Postgres (after asking for a reply) "
            "before the session is ended.",
            min=1,
        ),
    )
    on_unroutable: str = setting(
        "deadletter",
        Option(
            "A message no queue is bound for: dead-letter it, or fail and retry.",
            commands=_STREAM,
            section=MAPPING,
            choices=("deadletter", "fail"),
        ),
    )
    max_message_size: int = setting(
        128 * MiB,
        Option(
            "Bodies larger than this are dead-lettered (must not exceed the broker's limit).",
            commands=_PUBLISH,
            section=MAPPING,
            min=1,
            max=BROKER_MAX_MESSAGE_SIZE,
        ),
    )
    stats_interval: float = setting(
        10.0, Option("Seconds between progress log lines.", section=OBSERVABILITY, min=0.1)
    )
    slot_poll_interval: float = setting(
        15.0,
        Option(
            "Seconds between reads of the slot's lag, retained WAL and dead-letter backlog "
            "for /metrics (active and standby relays alike).",
            section=OBSERVABILITY,
            min=1.0,
        ),
    )
    allowed_exchanges: list[str] = field(
        default_factory=list,
        metadata={
            "cli": Option(
                "Comma-separated glob patterns of the exchanges messages may go to, the "
                f"configured --exchange included (empty: any); {DEFAULT_EXCHANGE_PATTERN} "
                "allows the default exchange (Celery tasks without an exchange); other rows "
                "are dead-lettered.",
                commands=_PUBLISH,
                section=MAPPING,
                metavar="PATTERNS",
            )
        },
    )
    allow_cc_headers: bool = setting(
        False,
        Option(
            "Let rows carry CC/BCC headers (sender-selected routing); "
            "by default such rows are dead-lettered.",
            commands=_PUBLISH,
            section=MAPPING,
        ),
    )
    metrics_port: int | None = setting(
        None,
        Option(
            "Serve /metrics, /healthz, /readyz on this port (0: any free port).",
            section=OBSERVABILITY,
            min=0,
            max=65535,
            value_type=int,
        ),
    )
    metrics_host: str = setting(
        "127.0.0.1", Option("Address the metrics server binds to.", section=OBSERVABILITY)
    )
    log_level: str = setting(
        "info",
        Option(
            "Log level (of every command).",
            commands=frozenset({GROUP}),
            section=OBSERVABILITY,
            choices=("debug", "info", "warning", "error"),
        ),
    )
    log_format: str = setting(
        "text",
        Option(
            "text: human-readable; json: one object per line (of every command).",
            commands=frozenset({GROUP}),
            section=OBSERVABILITY,
            choices=("text", "json"),
        ),
    )
    event_loop: str = setting(
        "asyncio",
        Option(
            "uvloop needs the `uvloop` extra (pip install 'cdc-relay[uvloop]').",
            section=FLOW,
            choices=("asyncio", "uvloop"),
        ),
    )

    @property
    def table_parts(self) -> tuple[str, str]:
        return split_table_name(self.table)

    @property
    def cloudevents_source(self) -> str:
        """``--ce-source``, or the default naming this outbox's database and table."""
        if self.ce_source is not None:
            return self.ce_source
        return default_source(dsn_database(self.dsn), *self.table_parts)

    @property
    def dead_letter_table(self) -> tuple[str, str]:
        schema, table = self.table_parts
        return schema, f"{table}_dead_letter"

    def check(self) -> None:
        """Raise ConfigError for the first value outside its option's domain."""
        for f in fields(self):
            opt = option_of(f.name)
            try:
                opt.check(opt.flag_for(f.name).split("/")[0], getattr(self, f.name))
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        if self.reconnect_min > self.reconnect_max:
            raise ConfigError("--reconnect-min must not exceed --reconnect-max")
        if not self.amqp_urls:
            raise ConfigError("no RabbitMQ URL given: set --amqp-url or CDC_RELAY_AMQP_URL")
        if any(not p for p in self.allowed_exchanges):
            raise ConfigError("--allowed-exchanges has an empty pattern")
        default = self.exchange if self.message_format != "celery" else ""
        if not exchange_allowed(self.allowed_exchanges, default):
            what = f"--exchange {default!r}" if default else "the default exchange ''"
            add = default or DEFAULT_EXCHANGE_PATTERN
            raise ConfigError(
                f"{what} is not allowed by --allowed-exchanges "
                f"({', '.join(self.allowed_exchanges)}): every row without an exchange would "
                f"be dead-lettered; add {add} to --allowed-exchanges"
            )
        if self.retention is not None and self.retention < MIN_RETENTION:
            raise ConfigError(
                f"--retention must be at least {MIN_RETENTION}: rows younger than that may "
                "still be needed by `cdc-relay resync`"
            )
        if not self.message_prefix:
            raise ConfigError("--message-prefix must not be empty (outbox_emit uses cdc_relay)")
        split_table_name(self.table)
        if self.ce_source is not None:
            try:
                check_source(self.ce_source)
            except ValueError as exc:
                raise ConfigError(f"--ce-source: {exc}") from None
        try:
            build_layout(self.layout, self.column, self.header_column)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if not SLOT_NAME.fullmatch(self.slot):
            raise ConfigError(
                f"invalid --slot {self.slot[:80]!r}: use 1-63 lowercase letters, digits "
                "and underscores"
            )


def dsn_database(dsn: str) -> str:
    """The database ``dsn`` connects to, as libpq picks it: dbname, PGDATABASE, else the user."""
    try:
        parsed = conninfo_to_dict(dsn)
    except psycopg.Error:
        parsed = {}
    for value in (
        parsed.get("dbname"),
        os.environ.get("PGDATABASE"),
        parsed.get("user"),
        os.environ.get("PGUSER"),
    ):
        if value:
            return str(value)
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no user name for this uid: libpq fails here too
        return "postgres"


def option_of(name: str) -> Option:
    """The CLI option of one Settings field."""
    opt = Settings.__dataclass_fields__[name].metadata.get("cli")
    if not isinstance(opt, Option):
        raise KeyError(f"Settings.{name} has no CLI option")
    return opt

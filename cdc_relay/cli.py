"""The ``cdc-relay`` command."""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import sys
from collections.abc import Callable
from typing import Any

import click
import orjson

from cdc_relay.config import DEFAULT_MAX_IN_FLIGHT, ConfigError, Settings, split_table_name
from cdc_relay.router import FORMATS


def _split_urls(_ctx: click.Context, _param: click.Parameter, value: Any) -> list[str]:
    urls: list[str] = []
    for item in value or ():
        urls.extend(u.strip() for u in item.split(",") if u.strip())
    return urls or ["amqp://guest:guest@localhost:5672/"]


def common_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The connection and naming options every command shares (DESIGN.md §6)."""
    options = [
        click.option(
            "--dsn",
            envvar="CDC_RELAY_DSN",
            default="postgresql://postgres@localhost:5432/postgres",
            show_default=True,
            help="Postgres connection string (the primary).",
        ),
        click.option(
            "--amqp-url",
            "amqp_urls",
            envvar="CDC_RELAY_AMQP_URL",
            multiple=True,
            callback=_split_urls,
            help="RabbitMQ URL; repeat (or comma-separate in the env var) for cluster nodes."
            "  [default: amqp://guest:guest@localhost:5672/]",
        ),
        click.option("--slot", envvar="CDC_RELAY_SLOT", default="cdc_relay", show_default=True),
        click.option(
            "--publication",
            envvar="CDC_RELAY_PUBLICATION",
            default="cdc_relay_outbox",
            show_default=True,
        ),
        click.option(
            "--table", envvar="CDC_RELAY_TABLE", default="public.outbox", show_default=True
        ),
        click.option(
            "--exchange", envvar="CDC_RELAY_EXCHANGE", default="outbox", show_default=True
        ),
        click.option(
            "--routing-key",
            envvar="CDC_RELAY_ROUTING_KEY",
            default="{aggregate_type}.{event_type}",
            show_default=True,
            help="Template for rows without their own routing_key.",
        ),
        click.option(
            "--format",
            "message_format",
            envvar="CDC_RELAY_FORMAT",
            type=click.Choice(FORMATS),
            default="event",
            show_default=True,
            help="event: the payload as a JSON event; celery: a Celery task message.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _settings(**kwargs: Any) -> Settings:
    known = {k: v for k, v in kwargs.items() if k in Settings.__dataclass_fields__}
    settings = Settings(**known)
    split_table_name(settings.table)
    return settings


def handle_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """A misconfiguration is one line on stderr and a non-zero exit, not a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ConfigError as exc:
            click.echo(f"cdc-relay: error: {exc}", err=True)
            sys.exit(exc.exit_code)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="cdc-relay")
def main() -> None:
    """Relay committed outbox rows from Postgres (logical replication) to RabbitMQ."""


@main.command()
@common_options
@click.option("--no-table", is_flag=True, help="Do not create the outbox table (you manage it).")
@click.option("--no-exchange", is_flag=True, help="Do not declare the exchange on RabbitMQ.")
@handle_errors
def init(no_table: bool, no_exchange: bool, **kwargs: Any) -> None:
    """Create the outbox table, publication, slot and exchange (idempotent)."""
    from cdc_relay.pg import admin

    settings = _settings(**kwargs)
    with admin.connect(settings.dsn) as conn:
        lines = admin.init(conn, settings, create_table=not no_table)
    if not no_exchange and settings.message_format == "event":
        lines.append(asyncio.run(_declare_exchange(settings)))
    for line in lines:
        click.echo(line)
    if all("already exist" in line for line in lines):
        click.echo("nothing to do: everything already existed")


async def _declare_exchange(settings: Settings) -> str:
    from cdc_relay.amqp import ConnectError, ExchangeError, declare_exchange

    try:
        result = await declare_exchange(settings.amqp_urls, settings.exchange)
    except ConnectError as exc:
        raise ConfigError(f"{exc}; check --amqp-url") from None
    except ExchangeError as exc:
        raise ConfigError(str(exc)) from None
    if result == "created":
        return f"exchange {settings.exchange}: created (durable topic)"
    return f"exchange {settings.exchange}: already exists"


@main.command()
@common_options
@click.option(
    "--max-in-flight",
    envvar="CDC_RELAY_MAX_IN_FLIGHT",
    default=DEFAULT_MAX_IN_FLIGHT,
    show_default=True,
    type=click.IntRange(1, 100_000),
    help="Unconfirmed publishes allowed at once (also the most a crash can replay).",
)
@click.option(
    "--status-interval",
    envvar="CDC_RELAY_STATUS_INTERVAL",
    default=1.0,
    show_default=True,
    type=click.FloatRange(0.05, 30),
    help="Seconds between standby status updates to Postgres.",
)
@click.option(
    "--confirm-timeout",
    envvar="CDC_RELAY_CONFIRM_TIMEOUT",
    default=30.0,
    show_default=True,
    type=click.FloatRange(0.1),
    help="Seconds to wait for a broker confirm before ending the session.",
)
@click.option(
    "--shutdown-timeout",
    envvar="CDC_RELAY_SHUTDOWN_TIMEOUT",
    default=10.0,
    show_default=True,
    type=click.FloatRange(0),
    help="On SIGTERM, seconds to wait for outstanding confirms.",
)
@click.option(
    "--on-unroutable",
    envvar="CDC_RELAY_ON_UNROUTABLE",
    type=click.Choice(["deadletter", "fail"]),
    default="deadletter",
    show_default=True,
    help="A message no queue is bound for: dead-letter it, or fail and retry.",
)
@click.option(
    "--max-message-size",
    envvar="CDC_RELAY_MAX_MESSAGE_SIZE",
    default=128 * 1024 * 1024,
    show_default=True,
    type=click.IntRange(1),
    help="Bodies larger than this are dead-lettered (match the broker's limit).",
)
@click.option(
    "--no-declare", "no_declare", is_flag=True, help="Do not declare the exchange at start."
)
@click.option(
    "--heartbeat",
    "amqp_heartbeat",
    envvar="CDC_RELAY_HEARTBEAT",
    default=10,
    show_default=True,
    type=click.IntRange(0),
    help="AMQP heartbeat in seconds.",
)
@click.option(
    "--tcp-keepalive-idle",
    envvar="CDC_RELAY_TCP_KEEPALIVE_IDLE",
    default=10,
    show_default=True,
    type=click.IntRange(1),
    help="Seconds of silence before probing the Postgres connection.",
)
@click.option(
    "--tcp-keepalive-interval",
    envvar="CDC_RELAY_TCP_KEEPALIVE_INTERVAL",
    default=5,
    show_default=True,
    type=click.IntRange(1),
    help="Seconds between TCP keepalive probes.",
)
@click.option(
    "--tcp-keepalive-count",
    envvar="CDC_RELAY_TCP_KEEPALIVE_COUNT",
    default=3,
    show_default=True,
    type=click.IntRange(1),
    help="Unanswered probes before the connection is dead.",
)
@click.option(
    "--pg-timeout",
    envvar="CDC_RELAY_PG_TIMEOUT",
    default=30.0,
    show_default=True,
    type=click.FloatRange(1),
    help="Seconds without any data from Postgres (after asking for a reply) "
    "before the session is ended.",
)
@click.option(
    "--metrics-port",
    envvar="CDC_RELAY_METRICS_PORT",
    type=int,
    default=None,
    help="Serve /metrics, /healthz, /readyz on this port.",
)
@click.option(
    "--metrics-host", envvar="CDC_RELAY_METRICS_HOST", default="127.0.0.1", show_default=True
)
@click.option(
    "--stats-interval",
    envvar="CDC_RELAY_STATS_INTERVAL",
    default=10.0,
    show_default=True,
    type=click.FloatRange(0.1),
    help="Seconds between progress log lines.",
)
@click.option(
    "--log-level",
    envvar="CDC_RELAY_LOG_LEVEL",
    default="INFO",
    show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
)
@click.option(
    "--event-loop",
    envvar="CDC_RELAY_EVENT_LOOP",
    default="asyncio",
    show_default=True,
    type=click.Choice(["asyncio", "uvloop"]),
    help="uvloop needs the `uvloop` extra (pip install 'cdc-relay[uvloop]').",
)
@handle_errors
def run(
    no_declare: bool,
    metrics_port: int | None,
    metrics_host: str,
    log_level: str,
    event_loop: str,
    **kwargs: Any,
) -> None:
    """Stream outbox inserts to RabbitMQ until stopped (SIGTERM/SIGINT drain and exit 0)."""
    logging.basicConfig(
        level=log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("aiormq").setLevel(logging.WARNING)
    logging.getLogger("aio_pika").setLevel(logging.WARNING)
    settings = _settings(**kwargs)
    settings.declare_exchange = not no_declare
    if event_loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            raise ConfigError(
                "--event-loop uvloop: uvloop is not installed (pip install 'cdc-relay[uvloop]')"
            ) from None
        uvloop.run(_run(settings, metrics_host, metrics_port))
    else:
        asyncio.run(_run(settings, metrics_host, metrics_port))


def _dump_tasks() -> None:
    """SIGUSR1: print every asyncio task's stack to stderr (for a stuck relay)."""
    for task in asyncio.all_tasks():
        task.print_stack(file=sys.stderr)


async def _run(settings: Settings, metrics_host: str, metrics_port: int | None) -> None:
    from cdc_relay.metrics import Metrics, MetricsServer
    from cdc_relay.relay import Relay

    metrics = Metrics()
    relay = Relay(settings, metrics)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, relay.request_stop)
    loop.add_signal_handler(signal.SIGUSR1, _dump_tasks)
    server = None
    if metrics_port is not None:
        server = MetricsServer(metrics, metrics_host, metrics_port)
        await server.start()
    try:
        await relay.run()
    finally:
        if server is not None:
            await server.stop()


@main.command()
@common_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def status(as_json: bool, **kwargs: Any) -> None:
    """Slot, lag and publication; exit 0 only when healthy."""
    from cdc_relay.pg import admin

    settings = _settings(**kwargs)
    with admin.connect(settings.dsn) as conn:
        info = admin.status(conn, settings)
    if as_json:
        click.echo(orjson.dumps(info, option=orjson.OPT_INDENT_2).decode())
    else:
        for key, value in info.items():
            click.echo(f"{key:22} {value}")
    sys.exit(0 if info["healthy"] else 1)


@main.command()
@common_options
@click.option("--publication", "drop_publication", is_flag=True, help="Also drop the publication.")
@handle_errors
def drop(drop_publication: bool, **kwargs: Any) -> None:
    """Drop the replication slot (and with --publication, the publication)."""
    from cdc_relay.pg import admin

    settings = _settings(**kwargs)
    with admin.connect(settings.dsn) as conn:
        for line in admin.drop(conn, settings, publication=drop_publication):
            click.echo(line)


@main.group("dead-letters")
def dead_letters() -> None:
    """Inspect and replay rows that could not be published."""


@dead_letters.command("list")
@common_options
@click.option("--all", "include_replayed", is_flag=True, help="Include replayed rows.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@handle_errors
def dead_letters_list(include_replayed: bool, as_json: bool, **kwargs: Any) -> None:
    """List dead letters (pending ones unless --all)."""
    from cdc_relay.deadletters import list_dead_letters, record_as_json
    from cdc_relay.pg import admin

    settings = _settings(**kwargs)
    with admin.connect(settings.dsn) as conn:
        records = list_dead_letters(conn, settings, include_replayed=include_replayed)
    for record in records:
        if as_json:
            click.echo(record_as_json(record).decode())
        else:
            state = f"replayed {record.replayed_at}" if record.replayed_at else "pending"
            click.echo(
                f"{record.id}\t{record.outbox_id}\t{record.created_at}\t{state}\t{record.reason}"
            )
    if not as_json:
        click.echo(f"{len(records)} dead letter(s)", err=True)


@dead_letters.command("replay")
@common_options
@click.option("--id", "ids", multiple=True, type=int, help="Replay only these (repeatable).")
@handle_errors
def dead_letters_replay(ids: tuple[int, ...], **kwargs: Any) -> None:
    """Publish pending dead letters again (confirmed ones are marked replayed)."""
    from cdc_relay.deadletters import replay

    settings = _settings(**kwargs)
    results = asyncio.run(replay(settings, list(ids) or None))
    failed = 0
    for record, error in results:
        if error is None:
            click.echo(f"{record.id}\t{record.outbox_id}\treplayed")
        else:
            failed += 1
            click.echo(f"{record.id}\t{record.outbox_id}\tfailed: {error}")
    click.echo(f"{len(results) - failed} replayed, {failed} failed", err=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

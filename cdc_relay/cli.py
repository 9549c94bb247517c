"""The ``cdc-relay`` command.

Options are generated from ``Settings`` field metadata (``cdc_relay.config``),
so each default, range and help text exists once. Every failure the operator
can fix is one line on stderr, ``cdc-relay: error: ...``, and exit 2 (usage) or
78 (configuration); every line the process prints goes through a Redactor
holding the passwords of the DSNs and URLs it was given.

Secrets: ``--dsn`` / ``--amqp-url`` on the command line win; otherwise
``CDC_RELAY_DSN_FILE`` / ``CDC_RELAY_AMQP_URL_FILE`` (a file holding the value)
win over ``CDC_RELAY_DSN`` / ``CDC_RELAY_AMQP_URL``; otherwise the default.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import signal
import string
import sys
import traceback
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import click
import orjson
import psycopg
from click.core import ParameterSource
from psycopg.conninfo import conninfo_to_dict

from cdc_relay.config import Option, Settings
from cdc_relay.errors import EX_CONFIG, EX_SOFTWARE, ConfigError, RelayError
from cdc_relay.redact import Redactor, one_line
from cdc_relay.router import OutboxRow, Router, UnmappableRow

# Every password this process was given; applied to everything it prints.
REDACT = Redactor()
PROG = "cdc-relay"


def fail(message: str, code: int) -> None:
    """Print one redacted error line and exit."""
    click.echo(f"{PROG}: error: {REDACT(one_line(message))}", err=True)
    sys.exit(code)


class RelayCli(click.Group):
    """A click group whose every error is one line (click's usage block is several)."""

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        REDACT.add(*argv, *(os.environ.get(env, "") for env in _secret_envs()))
        try:
            rv = super().main(argv, prog_name or PROG, complete_var, False, **extra)
        except click.exceptions.Abort:
            sys.exit(130)
        except click.ClickException as exc:
            hint = f" (see {PROG} --help)" if isinstance(exc, click.UsageError) else ""
            fail(exc.format_message() + hint, exc.exit_code)
        except RelayError as exc:
            fail(str(exc), exc.exit_code)
        except psycopg.Error as exc:
            sqlstate = f" [SQLSTATE {exc.sqlstate}]" if exc.sqlstate else ""
            hint = ""
            if isinstance(exc, psycopg.errors.InsufficientPrivilege):
                hint = "; an admin can grant what the relay needs: cdc-relay init --grant-to ROLE"
            fail(f"Postgres: {str(exc).strip() or type(exc).__name__}{sqlstate}{hint}", EX_CONFIG)
        except Exception:
            click.echo(REDACT(traceback.format_exc()), err=True)
            fail("internal error (traceback above); please report it", EX_SOFTWARE)
        sys.exit(rv if isinstance(rv, int) else 0)


# -- options generated from Settings ---------------------------------------------------


def _secret_envs() -> list[str]:
    names = []
    for f in dataclasses.fields(Settings):
        opt: Option = f.metadata["cli"]
        if opt.secret:
            names.append(opt.env_for(f.name))
            if opt.file_env:
                names.append(opt.file_env)
    return names


def _read_secret_file(opt: Option) -> str | None:
    """The value of the _FILE variable, if set (the Docker/Kubernetes secrets convention)."""
    assert opt.file_env is not None
    path = os.environ.get(opt.file_env)
    if not path:
        return None
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8"
        raise click.BadParameter(f"cannot read {opt.file_env} ({path}): {reason}") from None
    REDACT.add(text)
    if not text:
        raise click.BadParameter(f"{opt.file_env} names an empty file ({path})")
    return text


def _resolve(ctx: click.Context, param: click.Parameter, opt: Option, name: str) -> str | None:
    """For a secret option not given on the command line: the _FILE value, or None."""
    source = ctx.get_parameter_source(param.name or name)
    if source in (ParameterSource.DEFAULT, ParameterSource.ENVIRONMENT) and opt.file_env:
        from_file = _read_secret_file(opt)
        if from_file is not None:
            return from_file
    env = opt.env_for(name)
    if source is ParameterSource.DEFAULT and os.environ.get(env) == "":
        raise click.BadParameter(f"{env} is set but empty")
    return None


def _split(items: Sequence[str] | str) -> list[str]:
    if isinstance(items, str):
        items = [items]
    return [part.strip() for item in items for part in re.split(r"[,\n]", item) if part.strip()]


def _check_dsn(dsn: str) -> None:
    """Parse the DSN once, as libpq will; never echo the fragment libpq quotes."""
    if not dsn.strip():
        raise click.BadParameter("the DSN is empty")
    try:
        parsed = conninfo_to_dict(dsn)
    except psycopg.Error as exc:
        # libpq quotes a piece of the string, which may be part of the password
        message = re.sub(
            r'"([^"]*)"', lambda m: m[0] if m[1] == "=" else '"..."', one_line(str(exc))
        )
        raise click.BadParameter(f"libpq cannot parse it: {message}") from None
    password = parsed.get("password")
    if password:
        REDACT.add_raw(str(password))
    for key in ("port", "connect_timeout"):
        for part in str(parsed.get(key) or "").split(","):
            if part.strip() and not (part.strip().isdigit() and int(part) <= 65535):
                raise click.BadParameter(f"its {key} is not a number")


def _check_amqp_url(url: str) -> None:
    """Reject what the publisher could not parse, with a fixed message (never the URL)."""
    parts = urlsplit(url)
    where = "an AMQP URL"
    if parts.scheme not in ("amqp", "amqps"):
        raise click.BadParameter(f"{where} must start with amqp:// or amqps://")
    if parts.password:
        REDACT.add_raw(parts.password, unquote(parts.password))
    try:
        parts.port  # noqa: B018 - raises ValueError for a non-numeric or out-of-range port
    except ValueError:
        raise click.BadParameter(
            f"{where} has an invalid port (percent-encode '/', '#', '?', '@' and ':' "
            "in the user name and password)"
        ) from None
    if not parts.hostname:
        raise click.BadParameter(f"{where} has no host")


def _callback(name: str, opt: Option, is_list: bool) -> Callable[..., Any]:
    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if opt.secret:
            from_file = _resolve(ctx, param, opt, name)
            if from_file is not None:
                value = from_file
        if is_list:
            default = Settings.__dataclass_fields__[name].default_factory()  # type: ignore[misc]
            given = ctx.get_parameter_source(param.name or name) is not ParameterSource.DEFAULT
            value = _split(value) if value else ([] if given else default)
            if opt.secret and not value:
                raise click.BadParameter("no URL given")
        if name == "dsn":
            _check_dsn(value)
        elif name == "amqp_urls":
            for url in value:
                _check_amqp_url(url)
        return value

    return callback


class Number(click.ParamType):
    """An int or float inside the option's range; nan and inf are refused."""

    def __init__(self, kind: type, opt: Option) -> None:
        self.kind = kind
        self.opt = opt
        self.name = kind.__name__

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, self.kind) and not isinstance(value, bool):
            number = value
        else:
            try:
                number = self.kind(str(value).strip())
            except ValueError:
                self.fail(f"{value!r} is not a valid {self.name}", param, ctx)
        try:
            self.opt.check("the value", number)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        return number


def _option(f: dataclasses.Field[Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    opt: Option = f.metadata["cli"]
    name = f.name
    flag = opt.flag_for(name)
    kwargs: dict[str, Any] = {
        "envvar": opt.env_for(name),
        "help": opt.help,
        "show_envvar": True,
        "metavar": opt.metavar,
    }
    missing = f.default is dataclasses.MISSING
    default = f.default_factory() if missing else f.default  # type: ignore[misc]
    if isinstance(default, bool):
        kwargs.update(default=default, show_default=True)
        if "/" not in flag:
            kwargs["is_flag"] = True
    elif isinstance(default, list):
        kwargs.update(multiple=True, callback=_callback(name, opt, True))
        if default:
            kwargs["show_default"] = ",".join(default)
    else:
        kind = opt.value_type or type(default)
        if opt.choices:
            kwargs["type"] = click.Choice(opt.choices, case_sensitive=False)
        elif kind in (int, float):
            kwargs["type"] = Number(kind, opt)
        kwargs.update(default=default, show_default=default is not None)
        if opt.secret:
            kwargs["callback"] = _callback(name, opt, False)
    return click.option(flag, name, **kwargs)


def settings_options(*scopes: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a command with the options of every Settings field in these scopes."""

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        chosen = [f for f in dataclasses.fields(Settings) if f.metadata["cli"].scope in scopes]
        for f in reversed(chosen):
            func = _option(f)(func)
        return func

    return decorate


def _settings(**kwargs: Any) -> Settings:
    """Settings from the parsed options; a bad combination is one ConfigError line."""
    known = {k: v for k, v in kwargs.items() if k in Settings.__dataclass_fields__}
    settings = Settings(**known)
    settings.check()
    REDACT.add(settings.dsn, *settings.amqp_urls)
    return settings


def check_routing_key(settings: Settings) -> None:
    """Render the template once against a sample row, so '{' fails at start, not per row."""
    template = settings.routing_key
    try:
        router = Router(settings.exchange, template, settings.message_format)
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise ConfigError(f"invalid --routing-key {template!r}: {exc}") from None
    known = {"id", "aggregate_type", "aggregate_id", "event_type", "payload"}
    for field in fields:
        root = re.split(r"[.\[]", field, maxsplit=1)[0]
        if root not in known:
            raise ConfigError(
                f"invalid --routing-key {template!r}: unknown field {{{root}}}; "
                f"use {', '.join('{' + k + '}' for k in sorted(known))}"
            )
    if any(re.split(r"[.\[]", f, maxsplit=1)[0] == "payload" for f in fields):
        return  # depends on each row's payload: such rows are dead-lettered one by one
    sample = OutboxRow("00000000-0000-0000-0000-000000000000", "order", "1", "Created", b"{}")
    try:
        router.render_routing_key(sample)
    except UnmappableRow as exc:
        raise ConfigError(f"invalid --routing-key {template!r}: {exc}") from None


# -- commands ----------------------------------------------------------------------------


@click.group(
    cls=RelayCli,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(package_name="cdc-relay")
def main() -> None:
    """Relay committed outbox rows from Postgres (logical replication) to RabbitMQ."""


@main.command()
@settings_options("common")
@click.option("--no-table", is_flag=True, help="Do not create the outbox table (you manage it).")
@click.option("--no-exchange", is_flag=True, help="Do not declare the exchange on RabbitMQ.")
@click.option(
    "--grant-to",
    metavar="ROLE",
    help="Grant this existing LOGIN REPLICATION role what run, status and dead-letters need.",
)
@click.option("--print-sql", is_flag=True, help="Print the SQL init applies, and exit.")
def init(
    no_table: bool, no_exchange: bool, grant_to: str | None, print_sql: bool, **kwargs: Any
) -> None:
    """Create the outbox table, dead-letter table, functions, publication, slot and exchange.

    Idempotent: a second run changes nothing and says so.
    """
    from cdc_relay.pg import admin

    settings = _settings(**kwargs)
    if print_sql:
        click.echo(admin.render_sql(settings), nl=False)
        return
    with admin.connect(settings.dsn) as conn:
        try:
            lines = admin.init(conn, settings, create_table=not no_table, grant_to=grant_to)
        except psycopg.errors.InsufficientPrivilege as exc:
            raise ConfigError(
                f"init needs an admin role (owner of the schema and table, allowed to create "
                f"publications and slots, e.g. a superuser): {one_line(str(exc))}"
            ) from None
    if not no_exchange and settings.message_format == "event":
        lines.append(asyncio.run(_declare_exchange(settings)))
    for line in lines:
        click.echo(line)
    if all("already exist" in line for line in lines):
        click.echo("nothing to do: everything already existed")


async def _declare_exchange(settings: Settings) -> str:
    """Passive first (does it exist?), then an active declare that checks its type.

    A passive declare succeeds for an exchange of any type; only the active one
    fails (406) for a fanout where the relay needs a topic exchange. Without the
    configure permission (403) an existing exchange is accepted unverified.
    """
    import aio_pika
    from aiormq.exceptions import (
        ChannelAccessRefused,
        ChannelNotFoundEntity,
        ChannelPreconditionFailed,
    )

    name = settings.exchange
    try:
        connection = await aio_pika.connect(settings.amqp_urls[0], timeout=10)
    except Exception as exc:
        raise ConfigError(
            f"cannot connect to RabbitMQ ({type(exc).__name__}: {exc}); check --amqp-url"
        ) from None
    async with connection:
        channel = await connection.channel()
        try:
            await channel.declare_exchange(name, "topic", durable=True, passive=True)
            existed = True
        except ChannelNotFoundEntity:
            existed = False
            channel = await connection.channel()
        try:
            await channel.declare_exchange(name, "topic", durable=True)
        except ChannelPreconditionFailed as exc:
            raise ConfigError(
                f"exchange {name} exists with other properties ({exc}); "
                "the relay needs a durable topic exchange: use another --exchange"
            ) from None
        except ChannelAccessRefused as exc:
            if existed:
                return f"exchange {name}: already exists (type not checked: {exc})"
            raise ConfigError(
                f"exchange {name} does not exist and this user may not declare it ({exc})"
            ) from None
        if existed:
            return f"exchange {name}: already exists"
        return f"exchange {name}: created (durable topic)"


@main.command()
@settings_options("common", "run")
def run(**kwargs: Any) -> None:
    """Stream outbox inserts to RabbitMQ until stopped (SIGTERM/SIGINT drain and exit 0)."""
    from cdc_relay import logs

    settings = _settings(**kwargs)
    check_routing_key(settings)
    logs.setup(settings.log_level, settings.log_format, REDACT)
    if settings.event_loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            raise ConfigError(
                "--event-loop uvloop: uvloop is not installed (pip install 'cdc-relay[uvloop]')"
            ) from None
        uvloop.run(_run(settings))
    else:
        asyncio.run(_run(settings))


def _dump_tasks() -> None:
    """SIGUSR1: print every asyncio task's stack to stderr (for a stuck relay)."""
    for task in asyncio.all_tasks():
        task.print_stack(file=sys.stderr)


async def _run(settings: Settings) -> None:
    from cdc_relay.metrics import Metrics, MetricsServer
    from cdc_relay.relay import Relay

    metrics = Metrics()
    relay = Relay(settings, metrics)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, relay.request_stop)
    loop.add_signal_handler(signal.SIGUSR1, _dump_tasks)
    server = None
    if settings.metrics_port is not None:
        server = MetricsServer(metrics, settings.metrics_host, settings.metrics_port)
        try:
            await server.start()
        except OSError as exc:
            raise ConfigError(
                f"cannot serve metrics on {settings.metrics_host}:{settings.metrics_port}: "
                f"{exc.strerror or exc}; fix --metrics-host/--metrics-port"
            ) from None
    try:
        await relay.run()
    finally:
        if server is not None:
            await server.stop()


@main.command()
@settings_options("common")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "--require-active/--no-require-active",
    default=True,
    show_default=True,
    help="Unhealthy unless a relay is attached to the slot.",
)
@click.option(
    "--max-lag-bytes",
    type=click.IntRange(0),
    default=None,
    help="Unhealthy when the slot's confirmed position is further behind than this.",
)
def status(as_json: bool, require_active: bool, max_lag_bytes: int | None, **kwargs: Any) -> None:
    """Slot, lag and publication; exit 0 only when healthy, 1 otherwise."""
    from cdc_relay.pg import admin

    settings = _settings(**kwargs)
    with admin.connect(settings.dsn) as conn:
        info = admin.status(
            conn, settings, require_active=require_active, max_lag_bytes=max_lag_bytes
        )
    if as_json:
        click.echo(orjson.dumps(info, option=orjson.OPT_INDENT_2).decode())
    else:
        for key, value in info.items():
            click.echo(f"{key:22} {value}")
    sys.exit(0 if info["healthy"] else 1)


@main.command()
@settings_options("common")
@click.option(
    "--drop-publication", is_flag=True, help="Also drop the publication (named by --publication)."
)
def drop(drop_publication: bool, **kwargs: Any) -> None:
    """Drop the replication slot (and with --drop-publication, the publication)."""
    from cdc_relay.pg import admin

    settings = _settings(**kwargs)
    with admin.connect(settings.dsn) as conn:
        for line in admin.drop(conn, settings, publication=drop_publication):
            click.echo(line)


_DURATION = re.compile(r"(\d+)([smhd])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


class Duration(click.ParamType):
    """``90s``, ``30m``, ``1h``, ``7d``."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, timedelta):
            return value
        match = _DURATION.fullmatch(str(value).strip())
        if match is None:
            self.fail(f"{value!r} is not a duration like 90s, 30m, 1h or 7d", param, ctx)
        try:
            return timedelta(**{_UNITS[match[2]]: int(match[1])})
        except OverflowError:
            self.fail(f"{value!r} is too long", param, ctx)


@main.command()
@settings_options("common")
@click.option("--older-than", type=Duration(), required=True, help="Retention, e.g. 7d.")
@click.option("--batch", type=click.IntRange(1, 100_000), default=1000, show_default=True)
def prune(older_than: timedelta, batch: int, **kwargs: Any) -> None:
    """Delete outbox rows older than the retention, in small batches."""
    from cdc_relay.pg import admin

    settings = _settings(**kwargs)
    with admin.connect(settings.dsn) as conn:
        total = admin.prune_outbox(
            conn,
            settings,
            older_than,
            batch=batch,
            progress=lambda n: click.echo(f"deleted {n} row(s) so far", err=True),
        )
    click.echo(f"deleted {total} outbox row(s) older than {older_than}")


@main.group("dead-letters")
def dead_letters() -> None:
    """Inspect, replay and prune rows that could not be published."""


@dead_letters.command("list")
@settings_options("common")
@click.option("--all", "include_replayed", is_flag=True, help="Include replayed rows.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def dead_letters_list(include_replayed: bool, as_json: bool, **kwargs: Any) -> None:
    """List dead letters (pending ones unless --all)."""
    from cdc_relay.deadletters import list_dead_letters, record_as_json
    from cdc_relay.pg import admin

    settings = _settings(**kwargs)
    with admin.connect(settings.dsn) as conn:
        records = list_dead_letters(
            conn, settings.dead_letter_table, include_replayed=include_replayed
        )
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
@settings_options("common")
@click.option("--id", "ids", multiple=True, type=int, help="Replay only these (repeatable).")
def dead_letters_replay(ids: tuple[int, ...], **kwargs: Any) -> None:
    """Publish pending dead letters again (confirmed ones are marked replayed)."""
    from cdc_relay.deadletters import replay
    from cdc_relay.pg import admin

    settings = _settings(**kwargs)
    with admin.connect(settings.dsn) as conn:
        results = asyncio.run(replay(conn, settings, list(ids) or None))
    failed = 0
    for record, error in results:
        if error is None:
            click.echo(f"{record.id}\t{record.outbox_id}\treplayed")
        else:
            failed += 1
            click.echo(f"{record.id}\t{record.outbox_id}\tfailed: {REDACT(error)}")
    click.echo(f"{len(results) - failed} replayed, {failed} failed", err=True)
    sys.exit(1 if failed else 0)


@dead_letters.command("prune")
@settings_options("common")
@click.option("--older-than", type=Duration(), required=True, help="Retention, e.g. 30d.")
@click.option("--include-pending", is_flag=True, help="Also delete never-replayed dead letters.")
@click.option("--batch", type=click.IntRange(1, 100_000), default=1000, show_default=True)
def dead_letters_prune(
    older_than: timedelta, include_pending: bool, batch: int, **kwargs: Any
) -> None:
    """Delete replayed dead letters (with --include-pending: all) older than the retention."""
    from cdc_relay import deadletters
    from cdc_relay.pg import admin

    settings = _settings(**kwargs)
    with admin.connect(settings.dsn) as conn:
        total = deadletters.prune(
            conn,
            settings.dead_letter_table,
            older_than,
            include_pending=include_pending,
            batch=batch,
        )
    click.echo(f"deleted {total} dead letter(s) older than {older_than}")


if __name__ == "__main__":
    main()

"""The ``cdc-relay`` command.

Its options are generated from ``Settings`` (``cdc_relay.cli_options``), so each
default, range and help text exists once. Every failure the operator can fix is
one line on stderr, ``cdc-relay: error: ...``, and exit 2 (usage) or 78
(configuration); every line the process prints goes through the Redactor holding
the passwords of the DSNs and URLs it was given.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import traceback
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import click
import orjson
import psycopg

from cdc_relay import cli_deadletters
from cdc_relay.cli_options import (
    EXIT_CODES,
    REDACT,
    Duration,
    SectionedCommand,
    check_routing_key,
    one_outbox,
    outboxes_of,
    relay_file,
    secret_envs,
    settings_from,
    settings_options,
)
from cdc_relay.config import (
    DL_LIST,
    DL_PRUNE,
    DL_REPLAY,
    DROP,
    GROUP,
    INIT,
    PRUNE,
    RESYNC,
    RUN,
    STATUS,
    Settings,
)
from cdc_relay.errors import EX_CONFIG, EX_SOFTWARE, ConfigError, RelayError
from cdc_relay.redact import one_line

# Every password this process was given; applied to everything it prints.
PROG = "cdc-relay"


def fail(message: str, code: int) -> None:
    """Print one redacted error line (a log record once the log is set up) and exit."""
    from cdc_relay import logs

    line = REDACT(one_line(message))
    if logs.configured():
        logging.getLogger(logs.COMMAND).error(line)
    else:
        click.echo(f"{PROG}: error: {line}", err=True)
    sys.exit(code)


def say(message: str, level: int = logging.INFO, extra: dict[str, Any] | None = None) -> None:
    """What a command tells the operator on stderr: a warning, progress; JSON with --log-format."""
    from cdc_relay import logs

    logging.getLogger(logs.COMMAND).log(level, REDACT(message), extra=extra)


def progress_meter(verb: str, unit: str, total: int | None = None) -> Any:
    """A ``cli_progress.Meter`` on stderr: a rewritten line on a terminal, DEBUG lines elsewhere."""
    import time

    from cdc_relay.cli_progress import Meter, Progress

    return Meter(
        Progress(verb, unit, time.monotonic(), total),
        on_terminal=sys.stderr.isatty(),
        show=lambda text: click.echo("\r\x1b[K" + REDACT(text), err=True, nl=False),
        note=lambda text: say(text, logging.DEBUG),
    )


def finish_meter(meter: Any, done: int) -> None:
    """Clear the terminal line and say the summary once (a JSON log line's fields too)."""
    import time

    meter.done = done
    if meter.on_terminal:
        click.echo("\r\x1b[K", err=True, nl=False)
    now = time.monotonic()
    say(meter.progress.summary(meter.done, now), extra=meter.progress.fields(meter.done, now))


class RelayCli(click.Group):
    """A click group whose every error is one line (click's usage block is several)."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        REDACT.add(*argv, *(os.environ.get(env, "") for env in secret_envs()))
        try:
            rv = super().main(argv, PROG, complete_var, False, **extra)
        except click.exceptions.Abort:
            sys.exit(130)
        except click.ClickException as exc:
            hint = ""
            if isinstance(exc, click.UsageError):
                hint = f" (see {exc.ctx.command_path if exc.ctx else PROG} --help)"
            fail(exc.format_message() + hint, exc.exit_code)
        except RelayError as exc:
            fail(str(exc), exc.exit_code)
        except (psycopg.errors.LockNotAvailable, psycopg.errors.QueryCanceled) as exc:
            # The command's statement or lock timeout: a lock held by someone else, not a setting.
            fail(
                f"Postgres: {exc.diag.message_primary or exc} [SQLSTATE {exc.sqlstate}]; "
                "a VACUUM FULL, a migration or another long lock is in the way (see pg_locks)",
                1,
            )
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


# -- commands ----------------------------------------------------------------------------


@click.group(
    cls=RelayCli,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(package_name="cdc-relay")
@settings_options(GROUP)
def main(log_level: str, log_format: str) -> None:
    """Relay committed outbox rows from Postgres (logical replication) to RabbitMQ."""
    from cdc_relay import logs

    logs.setup(log_level, log_format, REDACT)
    ctx = click.get_current_context()
    logging.getLogger(logs.COMMAND).debug(
        "%s %s", ctx.command_path, ctx.invoked_subcommand or "", extra={"pid": os.getpid()}
    )


@main.command(cls=SectionedCommand)
@settings_options(INIT)
@click.option(
    "--no-table",
    is_flag=True,
    help="Do not create the outbox table: use yours, or without one, a table-less outbox "
    "(outbox_emit only, empty publication).",
)
@click.option("--no-exchange", is_flag=True, help="Do not declare the exchange on RabbitMQ.")
@click.option(
    "--grant-to",
    metavar="ROLE",
    help="Grant this existing LOGIN REPLICATION role what run, status and dead-letters need.",
)
@click.option(
    "--emit",
    is_flag=True,
    help="Create <table>_emit and its signing key (emitted messages): callable only by its "
    "owner and the --grant-emit-to roles. Always for a table-less outbox.",
)
@click.option(
    "--grant-emit-to",
    metavar="ROLE",
    multiple=True,
    help="Let this existing role call <table>_emit (implies --emit; repeatable).",
)
@click.option(
    "--failover",
    is_flag=True,
    help="Create the slot as a failover slot (PostgreSQL 17+) that standbys keep a copy of.",
)
@click.option(
    "--no-inbox",
    is_flag=True,
    help="Do not create processed_messages (the consumers' dedupe table) here; consumers "
    "create it in their database with cdc_relay.inbox.ddl() or the Django migration.",
)
@click.option("--print-sql", is_flag=True, help="Print the SQL init applies, and exit.")
def init(
    no_table: bool,
    no_exchange: bool,
    grant_to: str | None,
    emit: bool,
    grant_emit_to: tuple[str, ...],
    failover: bool,
    no_inbox: bool,
    print_sql: bool,
    **kwargs: Any,
) -> None:
    """Create the outbox table, dead-letter table, functions, publication, slot and exchange.

    Idempotent: a second run changes nothing and says so.
    """
    from cdc_relay.pg import catalog, setup

    outboxes = outboxes_of(settings_from(**kwargs))
    if print_sql:
        for index, each in enumerate(outboxes):
            click.echo(setup.render_sql(each, inbox=not no_inbox and index == 0), nl=False)
        return
    lines: list[str] = []
    with catalog.connect(outboxes[0].dsn) as conn:
        for index, settings in enumerate(outboxes):  # the first creates the publication
            try:
                lines += setup.init(
                    conn,
                    settings,
                    create_table=not no_table,
                    grant_to=grant_to,
                    failover=failover,
                    # Emitted messages are the first outbox's (its key signs them).
                    emit=emit and index == 0,
                    grant_emit_to=grant_emit_to if index == 0 else (),
                    inbox=not no_inbox and index == 0,
                    progress=say,
                )
            except psycopg.errors.InsufficientPrivilege as exc:
                raise ConfigError(
                    f"init needs an admin role (owner of the schema and table, allowed to create "
                    f"publications and slots, e.g. a superuser): {one_line(str(exc))}"
                ) from None
    declared: set[str] = set()
    for settings in outboxes:
        if not no_exchange and settings.message_format != "celery":
            if settings.exchange not in declared:
                lines.append(asyncio.run(_declare_exchange(settings)))
            declared.add(settings.exchange)
    for line in lines:
        click.echo(line)
    if all(_changed_nothing(line) for line in lines):
        click.echo("nothing to do: everything already existed")


def _changed_nothing(line: str) -> bool:
    """An init report line of something already there, or checked (a mapped table's columns)."""
    return "already exist" in line or "its columns fit" in line or ": not created (" in line


async def _declare_exchange(settings: Settings) -> str:
    """The one way to declare the exchange (every --amqp-url tried in turn)."""
    from cdc_relay.amqp import ConnectError, ExchangeError, declare_exchange

    try:
        result = await declare_exchange(
            settings.amqp_urls, settings.exchange, timeout=settings.amqp_connect_timeout
        )
    except ConnectError as exc:
        raise ConfigError(f"{exc}; check --amqp-url") from None
    except ExchangeError as exc:
        raise ConfigError(str(exc)) from None
    if result == "created":
        return f"exchange {settings.exchange}: created (durable topic)"
    return f"exchange {settings.exchange}: already exists"


@main.command(cls=SectionedCommand, exit_codes=EXIT_CODES)
@settings_options(RUN)
def run(**kwargs: Any) -> None:
    """Stream outbox inserts to RabbitMQ until stopped (SIGTERM/SIGINT drain and exit 0)."""

    outboxes = outboxes_of(settings_from(**kwargs))
    for each in outboxes:
        check_routing_key(each)
    settings = outboxes[0]
    if settings.event_loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            raise ConfigError(
                "--event-loop uvloop: uvloop is not installed (pip install 'cdc-relay[uvloop]')"
            ) from None
        uvloop.run(_run(settings, outboxes))
    else:
        asyncio.run(_run(settings, outboxes))


def _dump_tasks() -> None:
    """SIGUSR1: print every asyncio task's stack to stderr (for a stuck relay)."""
    for task in asyncio.all_tasks():
        task.print_stack(file=sys.stderr)


async def _run(settings: Settings, outboxes: Sequence[Settings]) -> None:
    from cdc_relay.metrics import Metrics, MetricsServer
    from cdc_relay.relay import Relay

    # A `table` label on the per-row counters only where the slot has several outboxes:
    # the series of a one-table relay stay as they were.
    metrics = Metrics(settings.slot, [o.table for o in outboxes] if len(outboxes) > 1 else ())
    relay = Relay(settings, metrics, outboxes)
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


@main.command(cls=SectionedCommand)
@settings_options(STATUS)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help='One JSON object on one line ("schema": 1; every key always present, null if unknown).',
)
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
@click.option(
    "--max-stall",
    type=Duration(),
    default="120s",
    show_default=True,
    help="Unhealthy when the relay's confirmed position has not moved for this long "
    "with messages waiting (a blocked broker, lost confirms).",
)
def status(
    as_json: bool,
    require_active: bool,
    max_lag_bytes: int | None,
    max_stall: timedelta,
    **kwargs: Any,
) -> None:
    """Slot, lag, publication and the relay's own report; exit 0 only when healthy, 1 otherwise.

    Every query is bounded (a locked table is reported, not waited for).
    """
    from cdc_relay.pg import catalog, report

    outboxes = outboxes_of(settings_from(**kwargs))
    settings = outboxes[0]
    with catalog.connect(
        settings.dsn,
        statement_timeout=catalog.READ_STATEMENT_TIMEOUT,
        lock_timeout=catalog.READ_LOCK_TIMEOUT,
    ) as conn:
        info = report.status(
            conn,
            settings,
            require_active=require_active,
            max_lag_bytes=max_lag_bytes,
            max_stall=max_stall,
            outboxes=outboxes,
        )
    from cdc_relay.status_view import render_text

    fields = info.as_dict()
    if as_json:
        click.echo(orjson.dumps(fields).decode())
    else:
        for line in render_text(fields):
            click.echo(REDACT(line))
    for warning in info.warnings:
        say(warning, logging.WARNING)
    sys.exit(0 if info.healthy else 1)


@main.command(cls=SectionedCommand)
@settings_options(DROP)
@click.option(
    "--drop-publication", is_flag=True, help="Also drop the publication (named by --publication)."
)
@click.option(
    "--force",
    is_flag=True,
    help="Drop even though the slot holds outbox rows the relay has not published, or a "
    "relay is attached (its connection is ended; it then stops).",
)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation (required off a terminal).")
def drop(drop_publication: bool, force: bool, yes: bool, **kwargs: Any) -> None:
    """Drop the replication slot (and with --drop-publication, the publication).

    Unless --force, refuses while a relay is attached or the slot holds outbox
    rows not yet published; afterwards prints the resync command that
    republishes them.
    """
    from cdc_relay.pg import catalog, dropping, setup

    # The slot and publication are the file's; its state row is the first outbox's.
    settings = outboxes_of(settings_from(**kwargs))[0]
    with catalog.connect(
        settings.dsn,
        statement_timeout=catalog.WRITE_STATEMENT_TIMEOUT,
        lock_timeout=catalog.READ_LOCK_TIMEOUT,
    ) as conn:
        hold = dropping.read_hold(conn, settings)
        refused = dropping.refusal(hold, force=force)
        if refused is not None:
            raise RelayError(refused)
        if (hold.exists or drop_publication) and not yes:
            _confirm_drop(settings.slot if hold.exists else None, drop_publication, settings)
        if hold.active_pid is not None:
            dropping.detach(conn, settings.slot)  # --force: refusal() let it through
        for line in setup.drop(conn, settings, publication=drop_publication):
            click.echo(line)
    if hold.exists and hold.unconfirmed_changes != 0 and hold.unconfirmed_bytes:
        click.echo(f"to republish what the slot held: {dropping.resync_command(hold, settings)}")


def _confirm_drop(slot: str | None, publication: bool, settings: Settings) -> None:
    """Ask on a terminal; off one, --yes is the only way to say yes."""
    what = " and ".join(
        [f"replication slot {slot}"] * (slot is not None)
        + [f"publication {settings.publication}"] * publication
    )
    if not sys.stdin.isatty():
        raise click.UsageError(f"drop {what}: not a terminal, so add --yes to confirm")
    if not click.confirm(f"drop {what}?", err=True):
        raise RelayError(f"{what}: not dropped")


@main.command(cls=SectionedCommand)
@settings_options(PRUNE)
@click.option("--older-than", type=Duration(), required=True, help="Retention, e.g. 7d.")
@click.option(
    "--batch",
    type=click.IntRange(1, 100_000),
    default=1000,
    show_default=True,
    help="Rows deleted per transaction (smaller: shorter locks, more round trips).",
)
def prune(older_than: timedelta, batch: int, **kwargs: Any) -> None:
    """Delete outbox rows older than the retention, in small batches."""
    import time

    from cdc_relay.cli_progress import Progress
    from cdc_relay.pg import catalog, retention

    settings = one_outbox(settings_from(**kwargs), PRUNE)
    meter = Progress("deleted", "outbox row(s)", time.monotonic())
    on_terminal = sys.stderr.isatty()

    def progress(done: int) -> None:
        if on_terminal:  # one line, rewritten; a log or a pipe gets only the summary
            click.echo("\r" + meter.line(done, time.monotonic()), err=True, nl=False)

    with catalog.connect(
        settings.dsn,
        statement_timeout=catalog.WRITE_STATEMENT_TIMEOUT,
        lock_timeout=catalog.READ_LOCK_TIMEOUT,
    ) as conn:
        total = retention.prune_outbox(
            conn,
            settings,
            older_than,
            batch=batch,
            progress=progress,
        )
    if on_terminal:
        click.echo("\r\x1b[K", err=True, nl=False)
    now = time.monotonic()
    say(meter.summary(total, now), extra=meter.fields(total, now))
    click.echo(f"deleted {total} outbox row(s) older than {older_than}")


@main.group("dead-letters")
def dead_letters() -> None:
    """Inspect, replay and prune rows that could not be published."""


@dead_letters.command("list", cls=SectionedCommand)
@settings_options(DL_LIST)
@click.option("--all", "include_replayed", is_flag=True, help="Include replayed rows.")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="One JSON object per line: the row's payload and headers nested, RFC 3339 times.",
)
def dead_letters_list(include_replayed: bool, as_json: bool, **kwargs: Any) -> None:
    """List dead letters (pending ones unless --all), oldest first, under a header row."""
    from cdc_relay import deadletters
    from cdc_relay.pg import catalog

    settings = one_outbox(settings_from(**kwargs), DL_LIST)
    with catalog.connect(
        settings.dsn,
        statement_timeout=catalog.READ_STATEMENT_TIMEOUT,
        lock_timeout=catalog.READ_LOCK_TIMEOUT,
    ) as conn:
        try:
            records = deadletters.list_dead_letters(
                conn, settings.dead_letter_table, include_replayed=include_replayed
            )
        except catalog.TIMEOUT_ERRORS as exc:
            table = ".".join(settings.dead_letter_table)
            fail(catalog.could_not_read(f"dead-letter table {table}", exc), 1)
            return
    if not as_json:
        click.echo("\t".join(deadletters.LIST_HEADER))
    for record in records:
        if as_json:
            click.echo(deadletters.record_as_json(record).decode())
        else:
            click.echo(deadletters.record_as_text(record))
    if not as_json:
        say(f"{len(records)} dead letter(s)")


@dead_letters.command("replay", cls=SectionedCommand)
@settings_options(DL_REPLAY)
@cli_deadletters.replay_options
def dead_letters_replay(
    ids: tuple[int, ...],
    since: datetime | None,
    until: datetime | None,
    reason: str | None,
    limit: int | None,
    to_exchange: str | None,
    to_routing_key: str | None,
    dry_run: bool,
    as_json: bool,
    **kwargs: Any,
) -> None:
    """Publish pending dead letters again, once per outbox row (confirmed ones are marked).

    Applies --allowed-exchanges, --allow-cc-headers and --max-message-size like
    run; one replay at a time per dead-letter table; a second run after success
    publishes nothing. --since/--until/--reason/--limit/--id narrow what it takes;
    --dry-run shows it without publishing.
    """
    import time

    from cdc_relay.pg import catalog
    from cdc_relay.replay import dry_run as replay_dry_run
    from cdc_relay.replay import replay

    settings = one_outbox(settings_from(**kwargs), DL_REPLAY)
    selection = cli_deadletters.selection_of(ids, since, until, reason, limit)
    redirect = cli_deadletters.redirect_of(to_exchange, to_routing_key)
    with catalog.connect(
        settings.dsn,
        statement_timeout=catalog.WRITE_STATEMENT_TIMEOUT,
        lock_timeout=catalog.READ_LOCK_TIMEOUT,
    ) as conn:
        if dry_run:
            results = replay_dry_run(conn, settings, selection, redirect)
        else:
            meter = progress_meter("replayed", "dead letter(s)")

            def on_round(settled: int) -> None:
                meter.update(settled, time.monotonic())

            results = asyncio.run(
                replay(conn, settings, selection=selection, redirect=redirect, on_round=on_round)
            )
            finish_meter(meter, len(results))
    if not results:
        say("nothing to replay: no pending dead letters match")
        return
    if not as_json:
        click.echo("\t".join(cli_deadletters.REPLAY_HEADER))
    for outcome in results:
        if as_json:
            line = cli_deadletters.outcome_as_json(outcome, dry_run)
        else:
            line = cli_deadletters.outcome_as_text(outcome, dry_run)
        click.echo(REDACT(line))
    say(cli_deadletters.summary(results, dry_run))
    sys.exit(1 if not dry_run and any(o.error is not None for o in results) else 0)


@dead_letters.command("prune", cls=SectionedCommand)
@settings_options(DL_PRUNE)
@click.option("--older-than", type=Duration(), required=True, help="Retention, e.g. 30d.")
@click.option("--include-pending", is_flag=True, help="Also delete never-replayed dead letters.")
@click.option(
    "--batch",
    type=click.IntRange(1, 100_000),
    default=1000,
    show_default=True,
    help="Rows deleted per transaction (smaller: shorter locks, more round trips).",
)
def dead_letters_prune(
    older_than: timedelta, include_pending: bool, batch: int, **kwargs: Any
) -> None:
    """Delete replayed dead letters (with --include-pending: all) older than the retention."""
    from cdc_relay import deadletters
    from cdc_relay.pg import catalog

    settings = one_outbox(settings_from(**kwargs), DL_PRUNE)
    with catalog.connect(
        settings.dsn,
        statement_timeout=catalog.WRITE_STATEMENT_TIMEOUT,
        lock_timeout=catalog.READ_LOCK_TIMEOUT,
    ) as conn:
        total = deadletters.prune(
            conn,
            settings.dead_letter_table,
            older_than,
            include_pending=include_pending,
            batch=batch,
        )
    click.echo(f"deleted {total} dead letter(s) older than {older_than}")


@main.command(cls=SectionedCommand)
@settings_options(RESYNC)
@click.option(
    "--since",
    type=cli_deadletters.Timestamp(),
    default=None,
    help="Publish outbox rows created at or after this time (ISO 8601; bare = UTC). "
    "Default: the relay's recorded last confirmed commit minus --margin.",
)
@click.option(
    "--margin",
    type=Duration(),
    default="15m",
    show_default=True,
    help="Without --since: how far before the recorded commit to start (your longest "
    "transaction writing outbox rows).",
)
@click.option(
    "--dry-run", is_flag=True, help="Say what would be done and count the rows; change nothing."
)
@click.option(
    "--failover",
    is_flag=True,
    help="Create the new slot as a failover slot (PostgreSQL 17+); kept anyway if the old one was.",
)
def resync(
    since: datetime | None, margin: timedelta, dry_run: bool, failover: bool, **kwargs: Any
) -> None:
    """Recreate a lost slot and publish the rows it missed from its snapshot: no gap.

    Refuses while a relay holds the slot. Safe to interrupt: run it again and it
    sends every row again (consumers dedupe on message_id).
    """
    from cdc_relay import resync as resync_
    from cdc_relay.pg import catalog

    outboxes = outboxes_of(settings_from(**kwargs))
    if len(outboxes) > 1:
        loaded = relay_file()
        raise ConfigError(
            f"resync: {loaded.path if loaded else 'the file'} has {len(outboxes)} [[outbox]] "
            "tables on one slot, and resync does not support several outboxes yet: see "
            "docs/config-file.md#commands"
        )
    settings = outboxes[0]
    check_routing_key(settings)
    with catalog.connect(settings.dsn) as conn:
        plan = resync_.plan(conn, settings, since, margin=margin, failover=failover)
    for line in plan.describe():
        click.echo(("would: " if dry_run else "") + line)
    if dry_run:
        return
    import time

    meter = progress_meter("resync: published", "row(s)", plan.rows or None)

    def say_line(line: str) -> None:
        click.echo(("\r\x1b[K" if meter.on_terminal else "") + REDACT(line), err=True)

    def on_count(read: int, confirmed: int, dead: int) -> None:
        meter.update(read, time.monotonic(), f" ({confirmed:,} confirmed, {dead:,} dead-lettered)")

    summary = asyncio.run(resync_.run_resync(settings, plan, say_line, on_count))
    finish_meter(meter, summary.rows)
    click.echo(summary.line(plan))


if __name__ == "__main__":
    main()

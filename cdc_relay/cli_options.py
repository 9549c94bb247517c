"""The ``cdc-relay`` command line options, generated from ``Settings``.

Each Settings field carries an ``Option`` (``cdc_relay.config``); this module
turns it into a click option with its env var, type and range, so each default
exists once. Values are checked here, once, at startup: ranges (nan and inf
refused), DSN and AMQP URL syntax (never echoing them), secrets read from
``*_FILE`` variables, and the routing-key template rendered against a sample row.

Secrets: ``--dsn`` / ``--amqp-url`` on the command line win; otherwise
``CDC_RELAY_DSN_FILE`` / ``CDC_RELAY_AMQP_URL_FILE`` (a file holding the value)
win over ``CDC_RELAY_DSN`` / ``CDC_RELAY_AMQP_URL``; otherwise the default.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, Final
from urllib.parse import unquote, urlsplit

import click
import psycopg
from click.core import ParameterSource
from psycopg.conninfo import conninfo_to_dict

from cdc_relay import config_file
from cdc_relay.config import GROUP, SECTIONS, Option, Settings, option_of
from cdc_relay.errors import ConfigError
from cdc_relay.redact import Redactor, one_line
from cdc_relay.router import Router

# Every password this process was given; applied to everything it prints.
REDACT = Redactor()


def secret_envs() -> list[str]:
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
    weaker = (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP, ParameterSource.ENVIRONMENT)
    if source in weaker and opt.file_env:
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
            factory = Settings.__dataclass_fields__[name].default_factory
            default = factory() if callable(factory) else []
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


class Number(click.ParamType):  # type: ignore[type-arg]  # generic only from click 8.5
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
    factory = f.default_factory
    default = factory() if f.default is dataclasses.MISSING and callable(factory) else f.default
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
        elif kind is timedelta:
            kwargs["type"] = Duration()
        kwargs.update(default=default, show_default=default is not None)
        if opt.secret:
            kwargs["callback"] = _callback(name, opt, False)
    return click.option(flag, name, cls=SectionOption, section=opt.section, **kwargs)


class SectionOption(click.Option):
    """A click option that knows its help section (``Option.section``)."""

    def __init__(self, *args: Any, section: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.section = section


def settings_options(command: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate ``command`` with the options of every Settings field it uses, and no other.

    Every subcommand also takes ``--config`` (the relay file, ``config_file``).
    """

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        chosen = [f for f in dataclasses.fields(Settings) if command in f.metadata["cli"].commands]
        for f in reversed(chosen):
            func = _option(f)(func)
        if command != GROUP:
            func = _config_option(func)
        return func

    return decorate


# -- the relay file (--config) -------------------------------------------------------

RELAY_FILE: Final = "cdc_relay.relay_file"  # ctx.meta key of the loaded RelayFile


def _load_config(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Eager: the file's top-level keys become click's default_map (flag > env > file)."""
    if value is None:
        return None
    relay_file = config_file.load(value)
    ctx.default_map = {**(ctx.default_map or {}), **relay_file.defaults}
    ctx.meta[RELAY_FILE] = relay_file
    return value


_config_option = click.option(
    "--config",
    metavar="FILE",
    envvar="CDC_RELAY_CONFIG",
    show_envvar=True,
    is_eager=True,
    expose_value=False,
    callback=_load_config,
    help="A TOML file of settings and [[outbox]] tables (several outboxes on one slot; "
    "docs/config-file.md). Flags and environment variables win over its top-level keys.",
)


def relay_file() -> config_file.RelayFile | None:
    """The file ``--config`` named, if any (read while the options were parsed)."""
    ctx = click.get_current_context(silent=True)
    return None if ctx is None else ctx.meta.get(RELAY_FILE)


def outboxes_of(settings: Settings) -> list[Settings]:
    """Every outbox the command works on: the file's ``[[outbox]]`` tables, or just ``settings``.

    A per-outbox option given as a flag or environment variable beside a file
    is refused (one line): it would be unclear which outbox it means.
    """
    loaded = relay_file()
    if loaded is None:
        return [settings]
    _refuse_per_outbox_options(loaded, allow_table=False)
    return config_file.outbox_settings(settings, loaded)


def one_outbox(settings: Settings, command: str) -> Settings:
    """The one outbox of a command that works on one table: ``--table`` picks it from a file."""
    loaded = relay_file()
    if loaded is None:
        return settings
    _refuse_per_outbox_options(loaded, allow_table=True)
    outboxes = config_file.outbox_settings(settings, loaded)
    ctx = click.get_current_context()
    if "table" in ctx.params and ctx.get_parameter_source("table") in _GIVEN:
        return config_file.select(outboxes, settings.table)
    if len(outboxes) > 1:
        names = ", ".join(o.table for o in outboxes)
        raise ConfigError(
            f"{command}: {loaded.path} has {len(outboxes)} [[outbox]] tables; "
            f"name one with --table ({names})"
        )
    return outboxes[0]


_GIVEN: Final = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)


def _refuse_per_outbox_options(loaded: config_file.RelayFile, *, allow_table: bool) -> None:
    ctx = click.get_current_context()
    for name in config_file.PER_OUTBOX:
        if name not in ctx.params or (allow_table and name == "table"):
            continue
        source = ctx.get_parameter_source(name)
        if source in _GIVEN:
            opt = option_of(name)
            given = (
                opt.flag_for(name) if source is ParameterSource.COMMANDLINE else opt.env_for(name)
            )
            raise ConfigError(
                f"{given.split('/')[0]}: with --config {loaded.path}, set "
                f"{config_file.file_key(name)} in its [[outbox]] tables instead"
            )


# What `run --help` ends with: supervisors tell these apart (cdc_relay.errors).
EXIT_CODES = (
    ("0", "stopped by SIGTERM/SIGINT after draining"),
    ("2", "a bad command line"),
    ("70", "an internal error or undecodable data: report it"),
    ("78", "a setting to fix (the one error line says which)"),
)


class SectionedCommand(click.Command):
    """A command whose help lists the options under their Settings sections.

    Options of the command alone (``--json``, ``--batch``) come first, under
    "Options"; the generated ones follow in ``config.SECTIONS`` order. With
    ``exit_codes`` the help ends with what each exit code means.
    """

    def __init__(self, *args: Any, exit_codes: Sequence[tuple[str, str]] = (), **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.exit_codes = tuple(exit_codes)

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        sections: dict[str, list[tuple[str, str]]] = {"Options": []}
        sections.update((name, []) for name in SECTIONS)
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            section = getattr(param, "section", None) or "Options"
            sections.setdefault(section, []).append(record)
        for name, records in sections.items():
            if records:
                with formatter.section(name):
                    formatter.write_dl(records)

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        super().format_epilog(ctx, formatter)
        if self.exit_codes:
            with formatter.section("Exit codes"):
                formatter.write_dl(list(self.exit_codes))


def settings_from(**kwargs: Any) -> Settings:
    """Settings from the parsed options; a bad combination is one ConfigError line.

    The options of ``cdc-relay`` itself (``--log-format``, ``--log-level``) come
    from the group's context, when there is one.
    """
    known = {k: v for k, v in kwargs.items() if k in Settings.__dataclass_fields__}
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        group = ctx.find_root().params
        for f in dataclasses.fields(Settings):
            if GROUP in f.metadata["cli"].commands and f.name in group:
                known.setdefault(f.name, group[f.name])
    settings = Settings(**known)
    if relay_file() is None:  # with a file, each outbox's Settings is checked (outboxes_of)
        settings.check()
    REDACT.add(settings.dsn, *settings.amqp_urls)
    return settings


def check_routing_key(settings: Settings) -> None:
    """The router's template check, at startup: '{' is one ConfigError line, not N dead letters."""
    template = settings.routing_key
    try:
        Router(settings.exchange, template, settings.message_format).check_template()
    except ValueError as exc:  # UnmappableRow included
        raise ConfigError(f"invalid --routing-key {template!r}: {exc}") from None


_DURATION = re.compile(r"(\d+)([smhd])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


class Duration(click.ParamType):  # type: ignore[type-arg]  # generic only from click 8.5
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

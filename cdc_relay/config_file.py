"""The relay file (``--config relay.toml``): several outboxes on one slot.

Pure: TOML text (or its parsed dict) in, a ``RelayFile`` out, and from it one
``Settings`` per outbox; every schema error is one ``ConfigError`` line naming
the file, the key and, inside ``[[outbox]]``, the table's index. The file's keys
are the long option names with ``_`` for ``-`` (``format`` for ``--format``,
``amqp_url`` for ``--amqp-url``), so every key is also a flag and an environment
variable. Top-level keys are settings for every outbox: the command line turns
them into click's ``default_map``, so a flag or environment variable still
wins (flag > env > file > default). ``[[outbox]]`` holds the per-outbox keys
(``PER_OUTBOX``) and nothing else.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Final

from cdc_relay.config import GROUP, Option, Settings, option_of
from cdc_relay.errors import ConfigError
from cdc_relay.schema import split_table_name

# The Settings fields that differ per outbox: the one list. Names not (yet) known to
# Settings are listed all the same (other options of issue 21); a file using one of
# them is refused in one line until this cdc-relay has the option.
PER_OUTBOX: Final = (
    "table",
    "exchange",
    "routing_key",
    "message_format",
    "layout",
    "column",
    "header_column",
    "ce_source",
)
OUTBOX_KEY: Final = "outbox"  # the array of tables: [[outbox]]
# Arrays read naturally in the plural (the issue's own example wrote ``header_columns``):
# each plural is the same key as its flag's name; a file giving both is refused.
KEY_ALIASES: Final = {"header_columns": "header_column", "columns": "column"}


@dataclass(frozen=True, slots=True)
class RelayFile:
    """A checked relay file: its top-level settings and its outboxes, by Settings field name."""

    path: str
    defaults: dict[str, Any]
    outboxes: tuple[dict[str, Any], ...]

    @property
    def tables(self) -> tuple[str, ...]:
        return tuple(str(o["table"]) for o in self.outboxes)


def file_key(name: str) -> str:
    """The key of a Settings field in the file: its long flag with ``_`` for ``-``."""
    if name not in Settings.__dataclass_fields__:
        return name
    flag = option_of(name).flag_for(name).split("/")[0]
    return flag.removeprefix("--").replace("-", "_")


def _fields_by_key() -> dict[str, str]:
    return {file_key(f.name): f.name for f in dataclasses.fields(Settings)}


def load(path: str | Path) -> RelayFile:
    """Read and check the file; a missing file or bad TOML is one line too."""
    where = str(path)
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read --config {where}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--config {where} is not UTF-8") from None
    return loads(text, where)


def loads(text: str, path: str = "<config>") -> RelayFile:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse(data, path)


def parse(data: Mapping[str, Any], path: str) -> RelayFile:
    """Check every key, type and range; the first problem is one ConfigError line."""
    by_key = _fields_by_key()
    per_outbox_keys = {file_key(name): name for name in PER_OUTBOX}
    defaults: dict[str, Any] = {}
    for given, value in data.items():
        if given == OUTBOX_KEY:
            continue
        where = f"{path}: {given}"
        key = _canonical(where, given, data)
        name = by_key.get(key)
        if name is None:
            raise ConfigError(_unknown(where, key, per_outbox_keys))
        if name == "table":
            raise ConfigError(f"{where}: each table goes in its own [[outbox]] with its exchange")
        if GROUP in option_of(name).commands:
            flag = option_of(name).flag_for(name)
            raise ConfigError(
                f"{where}: set {flag} before the command (or {option_of(name).env_for(name)}): "
                "the log is set up before the file is read"
            )
        defaults[name] = _checked(where, name, value)
    tables = data.get(OUTBOX_KEY)
    if tables is None:
        raise ConfigError(
            f"{path}: no [[outbox]]: add one [[outbox]] table (table, exchange) per outbox"
        )
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError(f"{path}: outbox must be an array of tables: write [[outbox]]")
    if not tables:
        raise ConfigError(f"{path}: no [[outbox]]: add one [[outbox]] table per outbox")
    outboxes: list[dict[str, Any]] = []
    seen: dict[tuple[str, str], int] = {}
    for index, table in enumerate(tables, 1):
        outbox = _outbox(path, index, table, per_outbox_keys, defaults)
        parts = split_table_name(outbox["table"])
        if parts in seen:
            raise ConfigError(
                f"{path}: [[outbox]] {index}: table {outbox['table']!r} is the same table as "
                f"[[outbox]] {seen[parts]}: each outbox table once"
            )
        seen[parts] = index
        outboxes.append(outbox)
    return RelayFile(path, defaults, tuple(outboxes))


def _canonical(where: str, key: str, table: Mapping[str, Any]) -> str:
    """``key``, or the key its plural spelling stands for (``KEY_ALIASES``)."""
    canonical = KEY_ALIASES.get(key, key)
    if canonical != key and canonical in table:
        raise ConfigError(f"{where}: the same key as {canonical}; give one of them")
    return canonical


def _unknown(where: str, key: str, per_outbox_keys: Mapping[str, str]) -> str:
    if key in per_outbox_keys:  # listed for [[outbox]], not an option of this cdc-relay yet
        return f"{where}: unknown key (this cdc-relay has no --{key.replace('_', '-')} option)"
    return f"{where}: unknown key (the keys are the long option names with _ for -)"


def _outbox(
    path: str,
    index: int,
    table: Mapping[str, Any],
    per_outbox_keys: Mapping[str, str],
    defaults: Mapping[str, Any],
) -> dict[str, Any]:
    label = f"{path}: [[outbox]] {index}"
    if "table" in table and isinstance(table["table"], str):
        label += f" ({table['table']})"
    outbox: dict[str, Any] = {}
    for given, value in table.items():
        where = f"{label}: {given}"
        key = _canonical(where, given, table)
        name = per_outbox_keys.get(key)
        if name is None:
            if key in _fields_by_key():
                raise ConfigError(f"{where}: not a per-outbox key; set it at the top of the file")
            raise ConfigError(f"{where}: unknown key (per outbox: {', '.join(per_outbox_keys)})")
        if name not in Settings.__dataclass_fields__:
            raise ConfigError(_unknown(where, key, per_outbox_keys))
        outbox[name] = _checked(where, name, value)
    for required in ("table", "exchange"):
        if required not in outbox and required not in defaults:
            raise ConfigError(f"{label}: missing key {file_key(required)}")
    try:
        split_table_name(outbox["table"])
    except ConfigError as exc:
        raise ConfigError(f"{label}: table: {exc}") from None
    return outbox


def _checked(where: str, name: str, value: Any) -> Any:
    """The value as the Settings field takes it, or one line saying what it should be."""
    f = Settings.__dataclass_fields__[name]
    opt: Option = option_of(name)
    default = f.default_factory() if callable(f.default_factory) else f.default
    kind = opt.value_type or type(default)
    if isinstance(default, list):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: must be a list of strings, not {_type(value)}")
        return list(value)
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: must be true or false, not {_type(value)}")
        return value
    if kind is timedelta:
        if not isinstance(value, str):
            raise ConfigError(f'{where}: must be a duration like "7d", not {_type(value)}')
        return value  # click's Duration converts it, like the flag's value
    if kind in (int, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: must be a number, not {_type(value)}")
        if kind is int and not isinstance(value, int):
            raise ConfigError(f"{where}: must be a whole number, not {value!r}")
        value = kind(value)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where}: must be a finite number")
    elif not isinstance(value, str):
        raise ConfigError(f"{where}: must be a string, not {_type(value)}")
    try:
        opt.check(where, value)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return value


def _type(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    names |= {list: "an array", dict: "a table"}
    return names.get(type(value), type(value).__name__)


def outbox_settings(base: Settings, relay_file: RelayFile) -> list[Settings]:
    """One Settings per ``[[outbox]]``, in file order: ``base`` with the outbox's own keys."""
    out = []
    for index, keys in enumerate(relay_file.outboxes, 1):
        settings = dataclasses.replace(base, **keys)
        try:
            settings.check()
        except ConfigError as exc:
            where = f"{relay_file.path}: [[outbox]] {index} ({keys['table']})"
            raise ConfigError(f"{where}: {exc}") from None
        out.append(settings)
    return out


def select(outboxes: Sequence[Settings], table: str) -> Settings:
    """The outbox named by ``--table`` (a command that works on one table)."""
    wanted = split_table_name(table)
    for settings in outboxes:
        if settings.table_parts == wanted:
            return settings
    names = ", ".join(s.table for s in outboxes)
    raise ConfigError(f"--table {table}: not an [[outbox]] of the file ({names})")

"""Log output of every ``cdc-relay`` command: human-readable text or one JSON object per line.

Both formats pass every rendered line through the process's Redactor, so a
password that reaches a log message (an exception text, a URL) is masked in the
last place before it leaves the process. What a command itself says to the
operator (``COMMAND``: its warnings, progress and the one error line) reads
``cdc-relay: warning: ...`` (progress: as it is) in text and is an object like
any other in JSON.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson

# Attributes every LogRecord has; anything else was passed as `extra=` and is a field.
_STANDARD = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None)).keys()
) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One object per line: time, level, logger, message, then any extra fields."""

    def __init__(self, redact: Callable[[str], str]) -> None:
        super().__init__()
        self._redact = redact

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        # Mask each value before encoding too: JSON escapes '"' and '\\', so a password
        # holding them no longer matches once encoded.
        entry = {k: self._redact(v) if isinstance(v, str) else v for k, v in entry.items()}
        line = orjson.dumps(entry, default=str).decode()
        return self._redact(line)


def _control_escapes() -> dict[int, str]:
    table = {code: f"\\x{code:02x}" for code in [*range(0x20), *range(0x7F, 0xA0)]}
    table.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"})
    table.update({0x2028: "\\u2028", 0x2029: "\\u2029"})  # line breaks to some readers
    return table


_CONTROL_ESCAPES = _control_escapes()


def escape_controls(text: str) -> str:
    """``text`` on one line: control characters as ``\\n``, ``\\x1b`` and the like.

    Row values (ids, routing keys, dead-letter reasons) reach text output; a
    newline in one forged a whole log line, an ESC could rewrite the terminal.
    Backslashes are left as they are, so escaping twice changes nothing and
    ordinary text (Windows paths, regexes) reads as written.
    """
    return text.translate(_CONTROL_ESCAPES)


# The logger of what a command says to the operator (not the relay's own log).
COMMAND = "cdc_relay.command"
_configured = False


class TextFormatter(logging.Formatter):
    """The default format, redacted, one line per record (tracebacks included)."""

    def __init__(self, redact: Callable[[str], str]) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._redact = redact

    def format(self, record: logging.LogRecord) -> str:
        if record.name == COMMAND and record.levelno <= logging.INFO:
            text = record.getMessage()  # progress and counts: as the command says them
        elif record.name == COMMAND:
            text = f"cdc-relay: {record.levelname.lower()}: {record.getMessage()}"
        else:
            text = super().format(record)
        # Redact first: a secret holding a control character still matches.
        return escape_controls(self._redact(text))


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """A handler on whatever ``sys.stderr`` is when a record is written."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def configured() -> bool:
    """Whether ``setup`` ran: a command's error line then goes through the log."""
    return _configured


def setup(level: str, fmt: str, redact: Callable[[str], str]) -> None:
    """Configure the root logger on stderr (replacing earlier handlers)."""
    global _configured
    _configured = True
    handler = _Stderr()
    handler.setFormatter(JsonFormatter(redact) if fmt == "json" else TextFormatter(redact))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger("aiormq").setLevel(logging.WARNING)
    logging.getLogger("aio_pika").setLevel(logging.WARNING)

"""The relay's own exceptions and the process exit codes they map to.

``SessionError`` ends one session only: the relay starts another.
``ConfigError`` and ``FatalError`` are siblings under ``RelayError``: both end
the process instead of a retry, but only one of them is the operator's setting
to fix, and code that handles one must not swallow the other by subclassing.
"""

from __future__ import annotations

# sysexits.h, so that supervisors (systemd, Kubernetes) can tell the cases apart.
EX_USAGE = 2  # click's own code for a bad command line
EX_SOFTWARE = 70  # internal software error
EX_CONFIG = 78  # configuration error


class RelayError(Exception):
    """Something retrying cannot fix: the process exits with ``exit_code``."""

    exit_code: int = 1


class ConfigError(RelayError):
    """A misconfiguration: one line saying what is wrong and how to fix it."""

    exit_code = EX_CONFIG


class SlotMissing(ConfigError):
    """The slot does not exist: a setting at startup; after streaming, maybe a failover."""


class SessionError(Exception):
    """Something ended one session; the relay starts another after a backoff (relay.py).

    Each I/O layer raises its own subclass (``core.SessionFailed``,
    ``amqp.PublishFailed`` and ``ConnectError``, ``pg.replication.ReplicationError``,
    ``deadletters.DeadLetterWriteFailed``), whose text says what happened.
    """


class FatalError(RelayError):
    """Something retrying cannot fix that is not a setting (e.g. undecodable WAL data)."""

    exit_code = EX_SOFTWARE

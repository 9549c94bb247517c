"""What a libpq failure means for the relay: the one place that reads libpq's words.

libpq reports a refused server certificate on the client side, without a
SQLSTATE, so only its message tells it apart from a network failure.
"""

from __future__ import annotations

from typing import Final

import psycopg

from cdc_relay.redact import one_line

# libpq's words for a server certificate it refuses (said by the client: no SQLSTATE).
_CERTIFICATE_REJECTED: Final = ("certificate verify failed", "does not match host name")


def certificate_rejected(exc: BaseException) -> str | None:
    """The error line for a server certificate libpq refused, else None.

    A wrong CA or host name fails the same way on every attempt: the operator
    must fix the setting, so the relay exits 78 instead of retrying forever.
    """
    if not isinstance(exc, psycopg.OperationalError):
        return None
    text = one_line(str(exc))
    if any(words in text for words in _CERTIFICATE_REJECTED):
        return f"cannot connect to Postgres: {text}; check sslrootcert and the host in --dsn"
    return None

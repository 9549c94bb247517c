"""AMQP URLs: parsed once, and never shown with their password."""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass


@dataclass(slots=True)
class AmqpAddress:
    host: str
    port: int
    user: str
    password: str
    vhost: str

    @classmethod
    def parse(cls, url: str) -> AmqpAddress:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "amqp":
            raise ValueError(f"unsupported AMQP URL scheme {parts.scheme!r} (use amqp://)")
        vhost = urllib.parse.unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
        return cls(
            host=parts.hostname or "localhost",
            port=parts.port or 5672,
            user=urllib.parse.unquote(parts.username or "guest"),
            password=urllib.parse.unquote(parts.password or "guest"),
            vhost=vhost,
        )


def redact(url: str) -> str:
    """Hide the password in a URL before it reaches a log line."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    creds, _, host = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"

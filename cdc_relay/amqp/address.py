"""AMQP URLs: parsed and checked once, TLS settings included, never shown with their password.

``amqps://`` URLs take RabbitMQ's URI query parameters (``cacertfile``,
``certfile``, ``keyfile``, ``verify``, ``server_name_indication``,
``auth_mechanism``) so a URL that works with RabbitMQ's own tools works here.
Every error message is written so that it cannot contain the password: a
malformed URL is described, never echoed (urllib's own messages can quote a
password that a stray ``/`` or ``#`` pushed into the "port").
"""

from __future__ import annotations

import logging
import ssl
import urllib.parse
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

DEFAULT_PORTS = {"amqp": 5672, "amqps": 5671}
_FILE_PARAMETERS = ("cacertfile", "certfile", "keyfile")
_PARAMETERS = (*_FILE_PARAMETERS, "verify", "server_name_indication", "auth_mechanism")


@dataclass(slots=True)
class AmqpAddress:
    host: str
    port: int
    user: str
    password: str = field(repr=False)
    vhost: str
    tls: bool = False
    cacertfile: str | None = None  # None: the system trust store
    certfile: str | None = None
    keyfile: str | None = None
    verify: bool = True
    server_name: str | None = None  # SNI and the name the certificate must match
    auth_mechanism: str = "PLAIN"

    @classmethod
    def parse(cls, url: str) -> AmqpAddress:
        """Parse and check a URL; ValueError (without the password) if it is not usable."""
        scheme, sep, rest = url.partition("://")
        scheme = scheme.lower()
        if not sep or scheme not in DEFAULT_PORTS:
            raise ValueError("an AMQP URL must start with amqp:// or amqps://")
        end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
        tail = rest[end:]
        if "@" in tail:
            raise ValueError(
                "the user or password in an AMQP URL contains '/', '?' or '#': "
                "percent-encode them (%2F, %3F, %23)"
            )
        if "#" in tail:
            raise ValueError("an AMQP URL has no '#' fragment")
        parts = urllib.parse.urlsplit(url)
        try:
            port = parts.port or DEFAULT_PORTS[scheme]
        except ValueError:
            raise ValueError("the port in an AMQP URL must be a number from 1 to 65535") from None
        address = cls(
            host=parts.hostname or "localhost",
            port=port,
            user=urllib.parse.unquote(parts.username or "guest"),
            password=urllib.parse.unquote(parts.password or "guest"),
            vhost=urllib.parse.unquote(parts.path[1:]) if len(parts.path) > 1 else "/",
            tls=scheme == "amqps",
        )
        address._apply_query(parts.query)
        return address

    def _apply_query(self, query: str) -> None:
        seen: set[str] = set()
        for key, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
            if key not in _PARAMETERS:
                raise ValueError(
                    f"unknown AMQP URL parameter {key!r} (known: {', '.join(_PARAMETERS)})"
                )
            if key in seen:
                raise ValueError(f"AMQP URL parameter {key!r} given twice")
            seen.add(key)
            if not self.tls:
                raise ValueError(f"AMQP URL parameter {key!r} needs an amqps:// URL")
            if key in _FILE_PARAMETERS:
                try:
                    with open(value, "rb"):
                        pass
                except OSError as exc:
                    raise ValueError(f"cannot read {key} {value!r}: {exc.strerror}") from None
                setattr(self, key, value)
            elif key == "verify":
                if value not in ("verify_peer", "verify_none"):
                    raise ValueError("verify must be verify_peer or verify_none")
                self.verify = value == "verify_peer"
            elif key == "server_name_indication":
                if not value:
                    raise ValueError("server_name_indication must not be empty")
                self.server_name = value
            else:
                if value.lower() not in ("plain", "external"):
                    raise ValueError("auth_mechanism must be plain or external")
                self.auth_mechanism = value.upper()
        if self.keyfile and not self.certfile:
            raise ValueError("keyfile needs certfile (the client certificate)")
        if self.auth_mechanism == "EXTERNAL" and not self.certfile:
            raise ValueError("auth_mechanism=external needs a client certificate (certfile)")
        if self.tls:
            self.ssl_context()  # a certificate or key that does not load is a bad URL too

    @property
    def tls_server_name(self) -> str | None:
        """The name sent as SNI and checked against the certificate (None without TLS)."""
        return (self.server_name or self.host) if self.tls else None

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS settings of this URL: verification and hostname check on unless verify_none."""
        if not self.tls:
            return None
        try:
            context = ssl.create_default_context(cafile=self.cacertfile)
            if not self.verify:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            if self.certfile:
                context.load_cert_chain(self.certfile, self.keyfile)
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(f"cannot load the TLS files of an AMQP URL: {exc}") from None
        return context


def redact(url: str) -> str:
    """Hide the password in a URL before it reaches a log line, malformed URLs included.

    Everything up to the last ``@`` is credentials, also without a scheme or
    with an unencoded ``/``, ``?`` or ``#`` in the password.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    if "@" not in rest:
        return url
    creds, _, host = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}"

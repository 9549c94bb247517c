"""Broker close frames to PublishFailed, naming the culprit when the reply text does.

RabbitMQ's reply texts are the only place that says which exchange a publish
was refused on (404 NOT_FOUND, 403 ACCESS_REFUSED) or what its message size
limit is (406 PRECONDITION_FAILED); parsing them lets the caller dead-letter
the one row that caused the close instead of retrying it forever. Pure
functions, tested on captured texts and against a live broker.
"""

from __future__ import annotations

import re

from cdc_relay import reasons
from cdc_relay.amqp.window import PublishFailed

NOT_FOUND = 404
ACCESS_REFUSED = 403
PRECONDITION_FAILED = 406

# "NOT_FOUND - no exchange 'x' in vhost '/'"
# "ACCESS_REFUSED - write access to exchange 'x' in vhost '/' refused for user 'u'"
_EXCHANGE = re.compile(r"exchange '(?P<name>.*)' in vhost '", re.DOTALL)
# "PRECONDITION_FAILED - message size 2000 is larger than configured max size 1000"
_MAX_SIZE = re.compile(r"message size \d+ is larger than (?:configured )?max size (?P<max>\d+)")


def refused_exchange(reply_code: int, reply_text: str) -> str | None:
    """The exchange a 404/403 channel close names, if any."""
    if reply_code not in (NOT_FOUND, ACCESS_REFUSED):
        return None
    match = _EXCHANGE.search(reply_text)
    return match.group("name") if match else None


def broker_max_message_size(reply_code: int, reply_text: str) -> int | None:
    """The broker's max_message_size a 406 close reports, if that is what it is."""
    if reply_code != PRECONDITION_FAILED:
        return None
    match = _MAX_SIZE.search(reply_text)
    return int(match.group("max")) if match else None


def close_error(what: str, reply_code: int | None, reply_text: str | None) -> PublishFailed:
    """The failure a channel.close or connection.close from the broker stands for."""
    # pamqp types both fields optional; a close always carries them in practice.
    code, text = reply_code or 0, reply_text or ""
    return PublishFailed(
        f"{what} closed by broker: {reply_code} {reply_text}",
        reply_code=reply_code,
        refused_exchange=refused_exchange(code, text),
        broker_max_message_size=broker_max_message_size(code, text),
        code=reasons.CHANNEL_CLOSED,
    )

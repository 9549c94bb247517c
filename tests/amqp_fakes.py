"""A TCP (optionally TLS) server that speaks just enough AMQP 0-9-1 to test the client side.

For what a real broker will not do on demand: offer other auth mechanisms,
ask for a client certificate, go silent after the handshake, never confirm,
block the connection. Frames are pamqp's, so both ends agree with the spec.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from pamqp import commands as spec
from pamqp import frame as pamqp_frame
from pamqp.base import Frame


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, Any]:
    head = await reader.readexactly(7)
    rest = await reader.readexactly(int.from_bytes(head[3:7], "big") + 1)
    _, channel, value = pamqp_frame.unmarshal(head + rest)
    return channel, value


@dataclass
class FakeBroker:
    """Handshake, channel.open, confirm.select and close; never routes or confirms anything.

    ``seen`` records the client's StartOk (mechanism, response) and TLS peer
    certificate; ``writers`` lets a test push frames (e.g. connection.blocked).
    """

    mechanisms: str = "PLAIN"
    heartbeat: int = 0
    seen: dict[str, Any] = field(default_factory=dict)
    frames: list[Any] = field(default_factory=list)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    port: int = 0

    def send(self, method: Frame, channel: int = 0) -> None:
        for writer in self.writers:
            writer.write(pamqp_frame.marshal(method, channel))

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        replies = {
            spec.Connection.Open: spec.Connection.OpenOk(),
            spec.Channel.Open: spec.Channel.OpenOk(),
            spec.Confirm.Select: spec.Confirm.SelectOk(),
            spec.Connection.Close: spec.Connection.CloseOk(),
        }
        self.writers.append(writer)
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            self.seen["header"] = await reader.readexactly(8)
            self.seen["peercert"] = writer.get_extra_info("peercert")
            start = spec.Connection.Start(mechanisms=self.mechanisms, locales="en_US")
            writer.write(pamqp_frame.marshal(start, 0))
            while True:
                channel, value = await read_frame(reader)
                self.frames.append(value)
                if isinstance(value, spec.Connection.StartOk):
                    self.seen["mechanism"] = value.mechanism
                    self.seen["response"] = value.response
                    tune = spec.Connection.Tune(
                        channel_max=16, frame_max=131072, heartbeat=self.heartbeat
                    )
                    writer.write(pamqp_frame.marshal(tune, 0))
                    continue
                reply = replies.get(type(value))
                if reply is not None:
                    writer.write(pamqp_frame.marshal(reply, channel))
                if isinstance(value, spec.Connection.Close):
                    break
        writer.close()


@contextlib.asynccontextmanager
async def running(broker: FakeBroker, context: ssl.SSLContext | None = None) -> AsyncIterator[int]:
    """Serve ``broker`` on a free loopback port; yields the port."""
    server = await asyncio.start_server(broker.serve, "127.0.0.1", 0, ssl=context)
    broker.port = server.sockets[0].getsockname()[1]
    try:
        yield broker.port
    finally:
        server.close()
        for writer in broker.writers:
            writer.close()

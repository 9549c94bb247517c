"""A loopback TCP proxy that tests use to cut or freeze connections.

``reset()`` closes every proxied connection at once (a connection reset);
``partition()`` keeps the sockets open but stops forwarding bytes and closes
(a silent partition, as when a VM freezes, a host loses power or a firewall
drops packets); ``heal()``
forwards again and accepts new connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self.connections_total = 0

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def url_host_port(self) -> tuple[str, int]:
        return "127.0.0.1", self.port

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self._flowing.is_set():
            # Partitioned: the connection attempt hangs like a dropped SYN would.
            await self._flowing.wait()
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self.connections_total += 1
        pair = (writer, up_writer)
        self._pairs.add(pair)
        try:
            await asyncio.gather(
                self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
            )
        finally:
            self._pairs.discard(pair)
            for w in pair:
                w.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            await self._flowing.wait()
            writer.write(data)
            await writer.drain()
        # A partition drops the FIN too: the other side learns of a close only after
        # heal(), as with a host that lost power (its peer's walsender holds the slot).
        await self._flowing.wait()
        with contextlib.suppress(OSError):
            writer.write_eof()

    def reset(self) -> None:
        """Abort every proxied connection with a TCP RST."""
        for pair in list(self._pairs):
            for w in pair:
                sock = w.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                        )
                w.transport.abort()
        self._pairs.clear()

    def partition(self) -> None:
        """Stop forwarding without closing anything."""
        self._flowing.clear()

    def heal(self) -> None:
        self._flowing.set()

    async def close(self) -> None:
        self.heal()
        self.reset()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

"""Postgres fixtures (a pytest plugin, loaded from conftest's ``pytest_plugins``).

``CDC_RELAY_TEST_DSN`` (e.g. docker compose users) replaces the throwaway
server for tests that only need a DSN; the server fixture is started lazily,
so a session that uses an external server never boots its own. Tests that
crash or restart a server, or need other settings or a version, get their own
from ``pg_factory``: the plugin, not the test module, owns its lifecycle.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

import pytest

from devtools.procs import Server
from devtools.servers import PostgresServer

S = TypeVar("S", bound=Server)


class ServerFactory(Generic[S]):
    """Private servers for one module's tests, all taken down at the module's end.

    So that no test module writes its own start/cleanup: a failed start is
    cleaned at once, everything else when the fixture ends (or on ``discard``).
    """

    def __init__(self, make: Callable[..., S]) -> None:
        self._make = make
        self._servers: list[S] = []

    def __call__(self, *, start: bool = True, **kwargs: Any) -> S:
        """A new server built with ``kwargs`` (started unless ``start=False``)."""
        return self.add(self._make(**kwargs), start=start)

    def add(self, server: S, start: bool = True) -> S:
        """Adopt a server the test built itself (a subclass, files to write before start)."""
        self._servers.append(server)
        if start:
            try:
                server.start()
            except BaseException:
                self.discard(server)
                raise
        return server

    def discard(self, server: S) -> None:
        """Take ``server`` down now: the test that used it is over."""
        with contextlib.suppress(ValueError):
            self._servers.remove(server)
        server.cleanup()

    @contextlib.contextmanager
    def running(self, **kwargs: Any) -> Iterator[S]:
        """A server for the body of a ``with`` block only."""
        server = self(**kwargs)
        try:
            yield server
        finally:
            self.discard(server)

    def close(self) -> None:
        for server in reversed(self._servers):
            with contextlib.suppress(Exception):
                server.cleanup()
        self._servers.clear()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    """One private Postgres (wal_level=logical) for the whole session."""
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def pg_dsn(request: pytest.FixtureRequest) -> str:
    """DSN of the external server if configured, else of the session's own."""
    external = os.environ.get("CDC_RELAY_TEST_DSN")
    if external:
        return external
    server: PostgresServer = request.getfixturevalue("pg_server")
    return server.dsn


@pytest.fixture(scope="module")
def pg_factory() -> Iterator[ServerFactory[PostgresServer]]:
    """``pg_factory(settings=..., version=...)``: a private Postgres the module may crash."""
    factory = ServerFactory(PostgresServer)
    try:
        yield factory
    finally:
        factory.close()

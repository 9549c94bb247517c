"""Every database driver the enqueue helpers support, behind one small interface.

Each factory opens a connection that is inside a transaction and returns
``(conn, commit, rollback, close)``; the helpers under test only ever see
``conn``, exactly as an application would hand it over.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import psycopg
import sqlalchemy
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

SyncHandle = tuple[Any, Callable[[], None], Callable[[], None], Callable[[], None]]
AsyncHandle = tuple[
    Any,
    Callable[[], Awaitable[None]],
    Callable[[], Awaitable[None]],
    Callable[[], Awaitable[None]],
]


def psycopg_connection(dsn: str) -> SyncHandle:
    conn = psycopg.connect(dsn)
    return conn, conn.commit, conn.rollback, conn.close


def _engine(dsn: str) -> sqlalchemy.Engine:
    return sqlalchemy.create_engine(
        "postgresql+psycopg://", creator=lambda: psycopg.connect(dsn), poolclass=sqlalchemy.NullPool
    )


def sqlalchemy_session(dsn: str) -> SyncHandle:
    engine = _engine(dsn)
    session = Session(engine)

    def close() -> None:
        session.close()
        engine.dispose()

    return session, session.commit, session.rollback, close


def sqlalchemy_connection(dsn: str) -> SyncHandle:
    engine = _engine(dsn)
    conn = engine.connect()

    def close() -> None:
        conn.close()
        engine.dispose()

    return conn, conn.commit, conn.rollback, close


SYNC_DRIVERS: dict[str, Callable[[str], SyncHandle]] = {
    "psycopg": psycopg_connection,
    "sqlalchemy-session": sqlalchemy_session,
    "sqlalchemy-connection": sqlalchemy_connection,
}


async def asyncpg_connection(dsn: str) -> AsyncHandle:
    conn = await asyncpg.connect(dsn)
    transaction = conn.transaction()
    await transaction.start()
    return conn, transaction.commit, transaction.rollback, conn.close


async def psycopg_async_connection(dsn: str) -> AsyncHandle:
    conn = await psycopg.AsyncConnection.connect(dsn)
    return conn, conn.commit, conn.rollback, conn.close


def _async_engine(dsn: str) -> Any:
    async def connect() -> Any:
        return await asyncpg.connect(dsn)

    return create_async_engine(
        "postgresql+asyncpg://", async_creator=connect, poolclass=sqlalchemy.NullPool
    )


async def sqlalchemy_async_session(dsn: str) -> AsyncHandle:
    engine = _async_engine(dsn)
    session = AsyncSession(engine)

    async def close() -> None:
        await session.close()
        await engine.dispose()

    return session, session.commit, session.rollback, close


async def sqlalchemy_async_connection(dsn: str) -> AsyncHandle:
    engine = _async_engine(dsn)
    conn = await engine.connect()

    async def close() -> None:
        await conn.close()
        await engine.dispose()

    return conn, conn.commit, conn.rollback, close


ASYNC_DRIVERS: dict[str, Callable[[str], Awaitable[AsyncHandle]]] = {
    "asyncpg": asyncpg_connection,
    "psycopg-async": psycopg_async_connection,
    "sqlalchemy-async-session": sqlalchemy_async_session,
    "sqlalchemy-async-connection": sqlalchemy_async_connection,
}

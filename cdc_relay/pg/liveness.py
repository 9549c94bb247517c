"""Is Postgres gone, or only busy? One question on a fresh connection.

A walsender decoding a long transaction of other tables' changes sends
nothing for up to half its ``wal_sender_timeout`` and does not answer reply
requests meanwhile; a silent partition looks the same from the replication
connection. A fresh connection tells them apart: it cannot get through a
partition, and through a busy server it finds our walsender still running.
"""

from __future__ import annotations

import asyncio

import psycopg

PROBE_TIMEOUT = 5.0


async def walsender_alive(dsn: str, pid: int, timeout: float = PROBE_TIMEOUT) -> bool:
    """True if Postgres answers within ``timeout`` and backend ``pid`` is still a walsender."""
    try:
        async with asyncio.timeout(timeout):
            conn = await psycopg.AsyncConnection.connect(
                dsn,
                autocommit=True,
                connect_timeout=max(2, int(timeout)),
                application_name="cdc-relay liveness",
            )
            try:
                cursor = await conn.execute(
                    "SELECT 1 FROM pg_stat_activity WHERE pid = %s AND backend_type = 'walsender'",
                    (pid,),
                )
                return await cursor.fetchone() is not None
            finally:
                await conn.close()
    except (TimeoutError, psycopg.Error, OSError):
        return False

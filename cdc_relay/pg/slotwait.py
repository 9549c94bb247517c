"""Say what a logical slot's creation waits for, while it waits.

Creating a logical slot returns only once every transaction that holds an xid
and started before it has ended (Postgres' snapshot builder needs a
consistent point); a prepared transaction counts until it is committed or
rolled back. Postgres says nothing meanwhile: ``init`` sat silent for 25 s
behind one open transaction. ``SlotCreationWatch`` asks on a connection of
its own every few seconds and reports each transaction by pid or gid, so the
operator can end it. It never affects the creation: a failure to ask only
stops the reports.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any, Final

import psycopg

from cdc_relay.redact import one_line

log = logging.getLogger("cdc_relay")

REPORT_INTERVAL: Final = 5.0  # seconds: the first report comes only if creation takes this long


@dataclass(frozen=True, slots=True)
class Blocker:
    """One transaction a slot creation waits for: a backend (pid) or a prepared one (gid)."""

    pid: int | None
    gid: str | None
    state: str | None
    age: int  # seconds since it started (backend) or was prepared (gid)


def describe(what: str, blockers: list[Blocker], waited: float) -> str:
    """One line naming every transaction the creation waits for, and how to end it."""
    if not blockers:
        return (
            f"{what}: waiting {waited:.0f}s for transactions that started before it to end "
            "(none visible to this role: ask an admin to look at pg_stat_activity and "
            "pg_prepared_xacts)"
        )
    parts = []
    for b in blockers:
        if b.gid is not None:
            parts.append(
                f"prepared transaction {b.gid!r} (prepared {b.age}s ago: COMMIT PREPARED or "
                "ROLLBACK PREPARED it)"
            )
        else:
            parts.append(f"pid {b.pid} ({b.state or 'unknown state'}, transaction {b.age}s old)")
    return (
        f"{what}: waiting {waited:.0f}s for {len(blockers)} transaction(s) that started before "
        f"it to end: {', '.join(parts)}"
    )


def blockers(conn: psycopg.Connection[Any], before: datetime, exclude_pid: int) -> list[Blocker]:
    """Transactions with an xid that started (or were prepared) before ``before``."""
    active = conn.execute(
        "SELECT pid, state, extract(epoch FROM now() - xact_start)::int FROM pg_stat_activity"
        " WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid() AND pid <> %s"
        " AND xact_start < %s ORDER BY xact_start",
        (exclude_pid, before),
    ).fetchall()
    prepared = conn.execute(
        "SELECT gid, extract(epoch FROM now() - prepared)::int FROM pg_prepared_xacts"
        " WHERE prepared < %s ORDER BY prepared",
        (before,),
    ).fetchall()
    return [Blocker(pid, None, state, age) for pid, state, age in active] + [
        Blocker(None, gid, None, age) for gid, age in prepared
    ]


class SlotCreationWatch:
    """A thread that reports what the slot creation waits for, every ``interval`` seconds."""

    def __init__(
        self,
        dsn: str,
        what: str,
        report: Callable[[str], None],
        *,
        exclude_pid: int = 0,
        interval: float = REPORT_INTERVAL,
    ) -> None:
        self._dsn = dsn
        self._what = what
        self._report = report
        self._exclude_pid = exclude_pid
        self._interval = interval
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cdc-relay-slot-wait", daemon=True)

    def __enter__(self) -> SlotCreationWatch:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._done.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        try:
            with psycopg.connect(
                self._dsn, autocommit=True, connect_timeout=10, application_name="cdc-relay wait"
            ) as conn:
                conn.execute("SET statement_timeout = '5s'")
                row = conn.execute("SELECT clock_timestamp()").fetchone()
                assert row is not None
                started: datetime = row[0]
                waited = 0.0
                while not self._done.wait(self._interval):
                    waited += self._interval
                    found = blockers(conn, started, self._exclude_pid)
                    if not self._done.is_set():
                        self._report(describe(self._what, found, waited))
        except (psycopg.Error, OSError) as exc:
            log.debug("cannot tell what the slot creation waits for: %s", one_line(str(exc)))

"""A PostgreSQL primary and a physical standby that syncs failover slots (issue 11: HA).

Built as the PostgreSQL 17 documentation and ``shared/reference/
postgres-failover-slots.md`` describe: a physical slot for the standby on the
primary; ``pg_basebackup -R -S <slot> -d "... dbname=postgres"`` (``dbname``
in ``primary_conninfo`` is what the slot-sync worker needs); on the standby
``sync_replication_slots = on`` and ``hot_standby_feedback = on``; on the
primary ``synchronized_standby_slots = <slot>``, so logical walsenders send
nothing the standby has not received (no phantom events after a failover).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path

import psycopg

from devtools.postgres import PostgresServer
from devtools.procs import LOOPBACK, ServerGroup, chown_tree

__all__ = ["PostgresPair"]


class PostgresPair(ServerGroup):
    """``primary`` and its streaming ``standby`` (PostgreSQL ``version`` >= 17)."""

    PREFIX = "cdc-relay-pgha-"

    def __init__(
        self, version: int = 17, standby_slot: str = "standby1_slot", base_dir: Path | None = None
    ) -> None:
        if version < 17:
            raise ValueError("failover slots need PostgreSQL 17 or later")
        self._init_dir(base_dir)
        self.standby_slot = standby_slot
        self.primary = PostgresServer(self.base_dir / "primary", version=version)
        self.standby = PostgresServer(
            self.base_dir / "standby",
            version=version,
            settings={"sync_replication_slots": "on", "hot_standby_feedback": "on"},
        )

    @property
    def dsn(self) -> str:
        """Both hosts; libpq picks the one that accepts writes (the relay's HA DSN)."""
        hosts = f"{LOOPBACK}:{self.primary.port},{LOOPBACK}:{self.standby.port}"
        return f"postgresql://postgres@{hosts}/postgres?target_session_attrs=read-write"

    def start(self, timeout: float = 60) -> None:
        """Primary, its standby slot, a base backup, the standby; then synchronized slots."""
        self.primary.start(timeout)
        if not (self.standby.data_dir / "PG_VERSION").exists():
            with psycopg.connect(self.primary.dsn, autocommit=True) as conn:
                conn.execute(
                    "SELECT pg_create_physical_replication_slot(%s)"
                    " WHERE NOT EXISTS (SELECT FROM pg_replication_slots WHERE slot_name = %s)",
                    (self.standby_slot, self.standby_slot),
                )
            self._base_backup(timeout)
        self.standby.start(timeout)
        self.primary.settings["synchronized_standby_slots"] = self.standby_slot
        self.primary.reload()

    def _base_backup(self, timeout: float) -> None:
        chown_tree(self.standby.base_dir, self.standby.user)
        source = f"host={LOOPBACK} port={self.primary.port} user=postgres dbname=postgres"
        result = self.primary._run(
            [
                str(self.primary.bindir / "pg_basebackup"),
                "-D",
                str(self.standby.data_dir),
                "-R",
                "-S",
                self.standby_slot,
                "-X",
                "stream",
                "--no-sync",
                "-d",
                source,
            ],
            timeout,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"pg_basebackup failed (exit {result.returncode}): {result.stderr.strip()}"
            )

    def wait_synced(self, slot: str, timeout: float = 60) -> None:
        """Wait until the standby holds a persistent synced copy of logical ``slot``.

        The standby first keeps a temporary copy (dropped at promotion) until the
        primary's slot is past the standby's catalog xmin; logging a standby
        snapshot on the primary, and the slot's consumer confirming it, gets it
        there. A slot nobody consumes is advanced here to the current position.
        """
        deadline = time.monotonic() + timeout
        with (
            psycopg.connect(self.primary.dsn, autocommit=True) as primary,
            psycopg.connect(self.standby.dsn, autocommit=True) as standby,
        ):
            while True:
                row = standby.execute(
                    "SELECT synced AND NOT temporary FROM pg_replication_slots"
                    " WHERE slot_name = %s",
                    (slot,),
                ).fetchone()
                if row is not None and row[0]:
                    return
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"slot {slot} not synced to the standby within {timeout:.0f}s "
                        f"(standby sees {row}):\n{self.standby.log_tail(20)}"
                    )
                primary.execute("SELECT pg_log_standby_snapshot()")
                primary.execute(
                    "SELECT pg_replication_slot_advance(slot_name, pg_current_wal_lsn())"
                    " FROM pg_replication_slots WHERE slot_name = %s AND NOT active",
                    (slot,),
                )
                time.sleep(0.5)

    def failover(self, timeout: float = 60) -> None:
        """Crash the primary (immediate stop) and promote the standby."""
        self.primary.stop("immediate")
        self.standby.promote(timeout)

    def members(self) -> Iterable[PostgresServer]:
        return (self.standby, self.primary)

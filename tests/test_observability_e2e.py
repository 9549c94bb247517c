"""Issue 18 against a real Prometheus: the shipped dashboard and alert rules on real relays.

An active relay and a standby on one slot, scraped every second by a private
Prometheus that evaluates deploy/prometheus/cdc-relay-rules.yml (a copy whose
``for:`` durations are 2 s, so the test waits seconds, not minutes), with
rows and some dead letters flowing. Then every PromQL expression of
deploy/grafana/cdc-relay.json (variables substituted as Grafana would) returns
data through the HTTP API, and every metric a panel names is in the scrape.

Then the active relay dies the way a host does when it loses power: its
TCP connections are not closed (the proxy in front of its Postgres stops
forwarding, then the relay is killed with SIGKILL), so Postgres holds the slot
until ``wal_sender_timeout`` (120 s here) and the standby cannot take over: the
case NoActiveRelay exists for. It must go to firing, and the standby's
``cdc_relay_slot_lag_bytes`` must grow as rows are written.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from devtools.metrics import get, readyz
from devtools.postgres import PostgresServer
from devtools.prometheus import PrometheusServer
from devtools.servers import free_port
from tests.dashboard import (
    PROCESS_METRICS,
    RELAY_METRICS,
    expressions,
    load,
    metric_names,
    substitute,
)
from tests.fix_pg import ServerFactory
from tests.harness import Consumer, RelayProcess, Setup, unique_names
from tests.proxy import TcpProxy

pytestmark = [pytest.mark.asyncio, pytest.mark.integration]

RULES = Path(__file__).resolve().parent.parent / "deploy" / "prometheus" / "cdc-relay-rules.yml"
STANDING_BY = "standing by:"
T = TypeVar("T")


def short_rules(path: Path) -> Path:
    """A copy of the shipped rules whose every ``for:`` is 2 s (the expressions unchanged)."""
    text = RULES.read_text()
    short = re.sub(r"^(\s+)for: \S+$", r"\1for: 2s", text, flags=re.M)
    assert short.count("for: 2s") == text.count("for: "), "every rule has a for:"
    path.write_text(short)
    return path


async def until(what: str, probe: Callable[[], Awaitable[T | None]], timeout: float) -> T:
    """Poll ``probe`` (1 s apart: the scrape interval) until it returns something; bounded."""
    deadline = time.monotonic() + timeout
    while True:
        found = await probe()
        if found is not None:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g}s")
        await asyncio.sleep(0.5)


async def query(prom: PrometheusServer, expr: str) -> list[dict[str, Any]]:
    return await asyncio.to_thread(prom.query, expr)


def scraped_names(port: int) -> set[str]:
    status, text = get(port, "/metrics")
    assert status == 200, status
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


async def test_dashboard_and_alerts_on_a_real_prometheus(
    pg_factory: ServerFactory[PostgresServer],
    prometheus_factory: ServerFactory[PrometheusServer],
    amqp_url: str,
    tmp_path: Path,
) -> None:
    # A cap on retained WAL, so that safe_wal_size is a number (the dashboard plots it).
    pg = pg_factory(settings={"max_slot_wal_keep_size": "'1GB'", "wal_sender_timeout": "'120s'"})
    setup = Setup(pg.dsn, amqp_url, unique_names("obs"))
    setup.init()
    slot = setup.settings.slot
    proxy = await TcpProxy("127.0.0.1", pg.port).start()
    through_proxy = dataclasses.replace(
        setup.settings, dsn=pg.dsn.replace(f":{pg.port}/", f":{proxy.port}/")
    )
    ports = {"active": free_port(), "standby": free_port()}
    instances = {role: f"127.0.0.1:{port}" for role, port in ports.items()}
    options = ("--slot-poll-interval", "1", "--routing-key", "routed.{event_type}")
    active = RelayProcess(
        through_proxy,
        tmp_path / "active.log",
        *options,
        log_level="INFO",
        metrics_port=ports["active"],
    )
    standby = RelayProcess(
        setup,
        tmp_path / "standby.log",
        *options,
        log_level="INFO",
        metrics_port=ports["standby"],
    )
    consumer = await Consumer(amqp_url, setup.names["exchange"], "routed.#").start()
    prom = prometheus_factory(
        targets=list(instances.values()),
        rule_files=[short_rules(tmp_path / RULES.name)],
        scrape_interval="1s",
        evaluation_interval="1s",
    )
    try:
        active.start()
        await active.wait_ready(60)
        standby.start()
        await standby.wait_for_log_async(STANDING_BY, 30)

        good: list[str] = []
        with psycopg.connect(setup.dsn) as conn:
            for n in range(5):
                good += setup.insert(conn, [{"event_type": f"E{n}"}, {"event_type": "F"}])
                conn.commit()
            setup.insert(conn, [{"routing_key": "nowhere.at.all"}])  # unroutable
            setup.insert(conn, [{"headers": ["not", "an", "object"]}])  # bad_row
            conn.commit()
        await consumer.wait_for(set(good), timeout=60)

        # Both relays scraped, and the dead letters seen through the slot poll.
        async def settled() -> bool | None:
            pending = await query(prom, f'cdc_relay_dead_letters_pending{{slot="{slot}"}} == 2')
            # rate() needs two samples in its window: a few scrapes of each relay.
            scrapes = await query(prom, 'count_over_time(up{job="cdc-relay"}[1m]) >= 3')
            return True if len(pending) == 2 and len(scrapes) == 2 else None

        await until("both relays scraped 3 times, 2 dead letters pending in both", settled, 60)

        # Roles as Prometheus sees them; both Ready in their role.
        for role, instance in instances.items():
            found = await query(prom, f'cdc_relay_role{{slot="{slot}",role="{role}"}} == 1')
            assert [r["metric"]["instance"] for r in found] == [instance], (role, found)
            assert readyz(ports[role]) == 200, role

        # Every dashboard expression returns data.
        dashboard = load()
        empty = []
        for title, expr in expressions(dashboard):
            promql = substitute(expr, slot, list(instances.values()), "1m")
            if not await query(prom, promql):
                empty.append((title, promql))
        assert not empty, f"dashboard expressions without data: {empty}"

        # Every metric a panel names (and the whole interface) is in the scrape.
        scraped = scraped_names(ports["active"]) | scraped_names(ports["standby"])
        named = set().union(*(metric_names(e) for _, e in expressions(dashboard)))
        assert named <= scraped, sorted(named - scraped)
        assert scraped >= RELAY_METRICS | PROCESS_METRICS, sorted(
            (RELAY_METRICS | PROCESS_METRICS) - scraped
        )
        assert not await query(prom, 'ALERTS{alertname="NoActiveRelay"}')

        standby_lag = f'cdc_relay_slot_lag_bytes{{slot="{slot}",instance="{instances["standby"]}"}}'
        before = float((await query(prom, standby_lag))[0]["value"][1])

        # The active relay's host dies: connections left hanging, the process killed.
        proxy.partition()
        active.kill()
        killed_at = time.monotonic()
        with psycopg.connect(setup.dsn) as conn:
            for n in range(20):
                setup.insert(conn, [{"event_type": "late", "payload": {"n": n, "pad": "x" * 500}}])
                conn.commit()

        def firing(name: str, **labels: str) -> Callable[[], Awaitable[dict[str, Any] | None]]:
            async def probe() -> dict[str, Any] | None:
                for alert in await asyncio.to_thread(prom.alerts):
                    found = alert["labels"]
                    ours = found["alertname"] == name and labels.items() <= found.items()
                    if ours and alert["state"] == "firing":
                        return alert
                return None

            return probe

        alert = await until("NoActiveRelay firing", firing("NoActiveRelay", slot=slot), 30)
        fired_after = time.monotonic() - killed_at
        assert alert["labels"]["severity"] == "critical"
        # The dead relay's target is down: RelayDown names it (and only it).
        await until("RelayDown firing", firing("RelayDown", instance=instances["active"]), 30)
        down = [
            a
            for a in await asyncio.to_thread(prom.alerts)
            if a["labels"]["alertname"] == "RelayDown"
        ]
        assert {a["labels"].get("instance") for a in down} == {instances["active"]}, down

        async def grown() -> float | None:
            found = await query(prom, standby_lag)
            lag = float(found[0]["value"][1]) if found else 0.0
            return lag if lag > before + 10_000 else None

        after = await until("the standby's slot lag growing", grown, 30)
        # The standby could not take over (the slot is held by the hanging connection).
        assert STANDING_BY in standby.log()
        assert "is free: taking over" not in standby.log()
        print(
            f"NoActiveRelay firing {fired_after:.1f}s after the kill; "
            f"standby lag {before:.0f} -> {after:.0f} bytes"
        )
    finally:
        active.stop_quietly()
        standby.stop_quietly()
        proxy.heal()
        await proxy.close()
        await consumer.close()
        setup.cleanup()
        print(f"--- active ---\n{active.log_tail(3000)}\n--- standby ---\n{standby.log_tail(3000)}")
        print(f"--- prometheus ---\n{prom.log_tail(20)}")

"""What an operator scrapes from a real active relay and its standby (issue 18).

Rows and dead letters flow through the active relay; both relays poll the slot.
Every ``cdc_relay_*`` series names the slot; the slot's lag, retained WAL,
wal_status and dead-letter backlog come from both; the roles are active and
standby and both answer /readyz 200; failures carry a reason label, the same
reason is a field of the JSON log line; the process collector is there and no
``*_created`` series is.
"""

from __future__ import annotations

import json
from pathlib import Path

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from devtools.amqp import declare_exchange
from devtools.metrics import get, readyz, role
from devtools.servers import free_port
from tests.harness import Consumer, RelayProcess, Setup, metrics_text, wait_until

pytestmark = pytest.mark.asyncio

STANDING_BY = "standing by:"
Scrape = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Scrape:
    """Every sample of a scrape: (name, sorted labels) -> value."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(scrape: Scrape, name: str, **labels: str) -> float | None:
    return scrape.get((name, tuple(sorted(labels.items()))))


async def test_an_active_relay_and_a_standby_as_prometheus_sees_them(
    outbox: Setup, tmp_path: Path
) -> None:
    await declare_exchange(outbox.amqp_url, outbox.names["exchange"])
    consumer = await Consumer(outbox.amqp_url, outbox.names["exchange"], "routed.#").start()
    slot = outbox.settings.slot
    options = ("--routing-key", "routed.{event_type}", "--slot-poll-interval", "1")
    options += ("--log-format", "json")
    active = RelayProcess(
        outbox, tmp_path / "active.log", *options, log_level="INFO", metrics_port=free_port()
    )
    standby = RelayProcess(
        outbox, tmp_path / "standby.log", *options, log_level="INFO", metrics_port=free_port()
    )
    ports = {"active": 0, "standby": 0}
    try:
        active.start()
        await active.wait_ready(60)
        standby.start()
        await standby.wait_for_log_async(STANDING_BY, 30)
        ports = {"active": active.metrics_port or 0, "standby": standby.metrics_port or 0}
        with psycopg.connect(outbox.dsn) as conn:
            good = outbox.insert(conn, [{"event_type": "A"}, {"event_type": "B"}])
            outbox.insert(conn, [{"routing_key": "nowhere.at.all"}])  # unroutable
            outbox.insert(conn, [{"headers": ["not", "an", "object"]}])  # bad_row
            conn.commit()
        await consumer.wait_for(set(good))

        async def scrape(which: str) -> Scrape:
            return samples(await metrics_text(ports[which]))

        def pending_seen_by_both() -> bool:
            return all(
                value(samples(get(p, "/metrics")[1]), "cdc_relay_dead_letters_pending", slot=slot)
                == 2
                for p in ports.values()
            )

        assert await wait_until(pending_seen_by_both, 20), "dead_letters_pending never 2 on both"

        for which in ports:
            text = await metrics_text(ports[which])
            scrape_ = samples(text)
            relay = [key for key in scrape_ if key[0].startswith("cdc_relay_")]
            assert relay, which
            unlabelled = [key for key in relay if dict(key[1]).get("slot") != slot]
            assert not unlabelled, (which, unlabelled)
            assert not [key for key in scrape_ if key[0].endswith("_created")], which
            assert "_created" not in text
            assert value(scrape_, "process_resident_memory_bytes"), which
            assert value(scrape_, "process_start_time_seconds"), which
            # The slot's health, from both relays' own polls.
            lag = value(scrape_, "cdc_relay_slot_lag_bytes", slot=slot)
            retained = value(scrape_, "cdc_relay_slot_retained_wal_bytes", slot=slot)
            assert lag is not None and lag >= 0, (which, lag)
            assert retained is not None and retained >= lag, (which, retained, lag)
            assert value(scrape_, "cdc_relay_slot_active", slot=slot) == 1, which
            assert value(scrape_, "cdc_relay_slot_wal_status", slot=slot, status="reserved") == 1
            assert value(scrape_, "cdc_relay_slot_wal_status", slot=slot, status="lost") == 0
            assert (
                "cdc_relay_slot_safe_wal_size_bytes",
                (("slot", slot),),
            ) in scrape_, which
            assert value(scrape_, "cdc_relay_slot_poll_failures_total", slot=slot) == 0
            assert value(scrape_, "cdc_relay_role", slot=slot, role=which) == 1, which
            assert value(scrape_, "cdc_relay_role", slot=slot, role="starting") == 0, which
            builds = [key for key in scrape_ if key[0] == "cdc_relay_build_info"]
            assert len(builds) == 1 and dict(builds[0][1])["version"], builds
            for name in ("cdc_relay_in_flight_messages", "cdc_relay_in_flight_bytes"):
                assert value(scrape_, name, slot=slot) == 0, (which, name)
            assert value(scrape_, "cdc_relay_amqp_blocked", slot=slot) == 0, which
            # Healthy in its role: a standby is ready too, so a rollout completes.
            assert readyz(ports[which]) == 200, which
            assert role(ports[which]) == which

        scrape_ = await scrape("active")
        dead = "cdc_relay_messages_dead_lettered_total"
        assert value(scrape_, dead, slot=slot, reason="unroutable") == 1
        assert value(scrape_, dead, slot=slot, reason="bad_row") == 1
        assert value(scrape_, dead, slot=slot, reason="too_large") == 0
        failures = "cdc_relay_publish_failures_total"
        assert value(scrape_, failures, slot=slot, reason="unroutable") == 1  # the return
        assert value(scrape_, failures, slot=slot, reason="nack") == 0
        assert value(scrape_, "cdc_relay_messages_confirmed_total", slot=slot) == 2
        last = value(scrape_, "cdc_relay_last_confirm_timestamp_seconds", slot=slot)
        assert last is not None and last > 1e9
        # The dead-letter log lines carry the same reason codes as fields.
        lines = [json.loads(line) for line in active.log().splitlines() if line.startswith("{")]
        reasons = sorted(
            line["reason"] for line in lines if line["message"].startswith("dead-lettered")
        )
        assert reasons == ["bad_row", "unroutable"], reasons
    finally:
        standby.stop_quietly()
        active.stop_quietly()
        await consumer.close()

"""The bench's own logic, without servers: verdicts, table rows, plots, config file, shapes."""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from bench import plots, report
from bench.broker import ceiling_shape
from bench.env import Phase, cdf_points
from bench.multiout import config_toml
from bench.rawamqp import RawAmqp
from bench.relayrun import histogram_cdf, message_shape, read_summary, shape_differences


def _drain(rows_per_s: float, cpu: float, wal: float | None = None) -> dict[str, Any]:
    d: dict[str, Any] = {
        "rows": 20_000,
        "seconds": 20_000 / rows_per_s,
        "rows_per_s": rows_per_s,
        "cpu_us_per_msg": cpu,
        "relay_cores": 0.4,
        "cpu": {"other": 0.0},
    }
    if wal is not None:
        d["walsender_cpu_us_per_row"] = wal
    return d


def _latency(rate: int, share_le_5ms: float) -> dict[str, Any]:
    n = rate * 5
    return {
        "n": n,
        "p50_ms": 0.5,
        "p95_ms": 1.0,
        "p99_ms": 2.0,
        "achieved_rate": rate,
        "missing": 0,
        "cdf": [[0.5, 0.5], [2.0, 0.99], [3.0, 1.0]],
        "commit_to_confirm": {
            "n": n,
            "p50_ms": 0.8,
            "p95_ms": 2.0,
            "p99_ms": 4.0,
            "share_le_5ms": share_le_5ms,
            "share_le_25ms": 1.0,
            "cdf": [[1.0, 0.6], [5.0, share_le_5ms], [25.0, 1.0]],
        },
        "cpu": {"other": 0.0},
    }


def results(**over: Any) -> dict[str, Any]:
    """A run's results as __main__ records them, with every number chosen to pass."""
    r: dict[str, Any] = {
        "quick": True,
        "started": "2026-12-03 19:00 UTC",
        "code": "abc1234",
        "machine": {
            "cpu": "test",
            "cores": 2,
            "memory_gb": 1,
            "kernel": "6",
            "python": "3.11",
            "loadavg_at_start": ["0", "0", "0"],
        },
        "sizes": {"backlog": 20_000, "big": 100_000, "seconds": 5.0, "rates": [5000, 10000]},
        "pg_ceiling_txn1": {"rows_per_s": 60_000.0, "seconds": 0.3},
        "broker_classic": {"msgs_per_s": 10_000.0, "seconds": 2.0, "window": 2000},
        "broker_quorum": {"msgs_per_s": 30_000.0, "seconds": 0.7, "window": 2000},
        "relay_drain_txn1": _drain(9_800.0, 4.0, 5.0),
        "relay_drain_txn100": _drain(12_000.0, 2.0, 2.5),
        "relay_drain_quorum": _drain(29_000.0, 4.0, 5.0),
        "relay_drain_dead_letter": _drain(8_000.0, 7.0, 5.0),
        "latency_5000": _latency(5000, 0.995),
        "raw_latency_5000": {
            "p50_ms": 0.3,
            "p99_ms": 1.1,
            "achieved_rate": 5000,
            "cdf": [[1.1, 0.99]],
        },
        "latency_10000": _latency(10000, 0.5),
        "peak_rss": {"peak_rss_mb": 60.0, "rows": 100_000, "rows_per_s": 9000.0},
    }
    r.update(over)
    return r


def test_every_issue_20_target_passes_when_its_numbers_do() -> None:
    v = report.verdicts(results())
    for key in (
        "drain_vs_broker",
        "quorum_drain_vs_broker_quorum",
        "relay_vs_walsender_txn1",
        "relay_vs_walsender_txn100",
        "dead_letter_rate_vs_happy",
        "dead_letter_cpu_vs_happy",
        "latency_5000",
        "peak_rss",
    ):
        assert v[key] is True, key


@pytest.mark.parametrize(
    ("change", "missed"),
    [
        ({"relay_drain_txn1": _drain(9_800.0, 5.1, 5.0)}, "relay_vs_walsender_txn1"),
        ({"relay_drain_txn100": _drain(12_000.0, 2.6, 2.5)}, "relay_vs_walsender_txn100"),
        ({"relay_drain_quorum": _drain(28_000.0, 4.0, 5.0)}, "quorum_drain_vs_broker_quorum"),
        ({"relay_drain_txn1": _drain(9_400.0, 4.0, 5.0)}, "drain_vs_broker"),
        ({"relay_drain_dead_letter": _drain(7_800.0, 7.0)}, "dead_letter_rate_vs_happy"),
        ({"relay_drain_dead_letter": _drain(8_000.0, 8.1)}, "dead_letter_cpu_vs_happy"),
        ({"latency_5000": _latency(5000, 0.989)}, "latency_5000"),
        ({"peak_rss": {"peak_rss_mb": 64.5, "rows": 1, "rows_per_s": 1.0}}, "peak_rss"),
    ],
)
def test_each_target_misses_just_past_its_bound(change: dict[str, Any], missed: str) -> None:
    assert report.verdicts(results(**change))[missed] is False


def test_table_has_a_row_with_target_and_verdict_per_target() -> None:
    text = report.table(results())
    for line in (
        "relay CPU per row / walsender CPU per row, 1-row txns",
        "relay CPU per row / walsender CPU per row, 100-row txns",
        "like-for-like broker ceiling (quorum)",
        "like-for-like broker ceiling (classic)",
        "dead-letter drain rate / happy drain rate",
        "dead-letter CPU per row / happy CPU per row",
    ):
        row = next(x for x in text.splitlines() if line in x)
        assert "| PASS (" in row, row
    latency = next(x for x in text.splitlines() if "latency @ 5,000 rows/s" in x)
    assert "PASS (commit->confirm p99 <= 5 ms)" in latency
    assert "raw publisher publish->confirm p50 0.3 / p99 1.1 ms" in latency
    assert "PASS (<= 64 MB)" in text
    assert "0.8x" in text  # 4.0 / 5.0 µs per row


def test_a_skipped_multi_outbox_step_is_one_row_saying_why() -> None:
    text = report.table(results(multi_outbox={"skipped": "`cdc-relay run` has no --config"}))
    assert "| several outboxes on one slot | skipped: `cdc-relay run` has no --config |" in text


def test_multi_outbox_rows_show_both_layouts() -> None:
    row = {"rows_per_s": 9000.0, "cpu_us_per_msg": 30.0, "walsender_cpu_us_per_row": 4.0}
    multi = {
        "rows_per_table": 5000,
        "2_shared": {**row, "outboxes": 2},
        "2_separate": {**row, "outboxes": 2, "walsender_cpu_us_per_row": 6.5},
    }
    sizes = {**results()["sizes"], "multi_outboxes": [2]}
    text = report.table(results(multi_outbox=multi, sizes=sizes))
    line = next(x for x in text.splitlines() if "2 outboxes x 5,000" in x)
    assert "one slot, one relay: 9,000 rows/s, relay 30.0 µs/row, walsender 4.0 µs/row" in line
    assert "a slot and relay each: 9,000 rows/s, relay 30.0 µs/row, walsender 6.5 µs/row" in line


def test_config_file_names_slot_publication_and_each_outbox() -> None:
    text = config_toml("s1", "p1", [("public.a", "ex_a"), ('public."b"', "ex_b")])
    assert tomllib.loads(text) == {
        "slot": "s1",
        "publication": "p1",
        "outbox": [
            {"table": "public.a", "exchange": "ex_a"},
            {"table": 'public."b"', "exchange": "ex_b"},
        ],
    }


def test_ceiling_message_shape_matches_the_relays_and_differences_are_named() -> None:
    relay = message_shape(
        "bench_ex_txn1",
        "order.OrderCreated",
        ceiling_shape()["body_bytes"],
        {
            "content_type": "application/json",
            "headers": {"aggregate_type": "order", "aggregate_id": "7", "event_type": "E"},
            "delivery_mode": 2,
            "message_id": "0b8e...",
            "timestamp": object(),
            "type": "OrderCreated",
            "app_id": "cdc-relay",
            "priority": None,
        },
    )
    assert shape_differences(relay, ceiling_shape()) == []
    relay["headers"] = {**relay["headers"], "trace": "str"}
    assert shape_differences(relay, ceiling_shape()) == [
        "headers: relay {'aggregate_id': 'str', 'aggregate_type': 'str', 'event_type': 'str',"
        " 'trace': 'str'}, ceiling {'aggregate_id': 'str', 'aggregate_type': 'str',"
        " 'event_type': 'str'}"
    ]


def test_cdf_points_are_monotonic_and_end_at_the_maximum() -> None:
    points = cdf_points([i / 1000 for i in range(1, 1001)])
    assert points[-1] == [1000.0, 1.0]
    assert points[49][1] == 0.5 and 499 <= points[49][0] <= 501
    assert all(a[0] <= b[0] and a[1] < b[1] for a, b in itertools.pairwise(points))
    assert cdf_points([]) == []


def test_histogram_cdf_is_the_share_per_finite_bucket_between_scrapes() -> None:
    inf = float("inf")
    before = {0.001: 10.0, 0.005: 10.0, inf: 10.0}
    after = {0.001: 60.0, 0.005: 99.0, inf: 110.0}
    assert histogram_cdf(before, after) == [[1.0, 0.5], [5.0, 0.89]]
    assert histogram_cdf(after, after) == []


def test_paced_confirm_times_expand_multiple_acks() -> None:
    client = RawAmqp.__new__(RawAmqp)
    client.ack_times = [0.0] * 8
    client._timed_upto = 0
    client._time_ack(3, True, 1.0)
    client._time_ack(5, False, 2.0)
    client._time_ack(6, True, 3.0)
    client._time_ack(99, True, 4.0)  # beyond what was published: ignored
    assert client.ack_times == [0.0, 1.0, 1.0, 1.0, 3.0, 2.0, 3.0, 0.0]


def test_plots_are_three_pngs(tmp_path: Path) -> None:
    written = plots.write_plots(results(), tmp_path)
    assert written == [str(tmp_path / name) for name in plots.FILES]
    for name in plots.FILES:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_matplotlib_plots_are_one_line_and_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name)
    )
    line = plots.write_plots(results(), tmp_path)
    assert line == "plots: not drawn, matplotlib is not installed (pip install -e '.[bench]')"
    assert list(tmp_path.iterdir()) == []


def test_plot_inputs_follow_the_results() -> None:
    r = results()
    assert [label for label, _ in plots.drain_bars(r)][:2] == [
        "Postgres ceiling\n(pg_recvlogical)",
        "broker ceiling\nclassic",
    ]
    assert plots.cpu_pairs(r)[0] == ("1-row txns\nclassic", 4.0, 5.0)
    curves = plots.latency_curves(r)
    assert curves[5000] == [
        ("cdc-relay commit->confirm (histogram buckets)", [[1.0, 0.6], [5.0, 0.995], [25.0, 1.0]]),
        ("raw publisher publish->confirm", [[1.1, 0.99]]),
    ]
    r["latency_5000"]["commit_to_confirm"]["cdf"].append([300_000.0, 1.0])
    assert plots.latency_curves(r)[5000][0][1][-1] == [25.0, 1.0]  # the flat tail is cut


async def _summary_of(code: str, limit: float = 30) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE
    )
    with Phase("load process", measure=False) as phase:
        return await read_summary(proc, phase, "running", limit)


@pytest.mark.asyncio
async def test_a_summary_printed_long_before_the_process_exits_is_kept() -> None:
    # The writer prints, then takes more than one polling second to exit: the case
    # that lost the summary when each second's wait cancelled communicate().
    code = "import json, time; print(json.dumps({'n': 7}), flush=True); time.sleep(2.5)"
    assert await _summary_of(code) == {"n": 7}


@pytest.mark.asyncio
async def test_a_load_process_without_a_summary_is_one_clear_error() -> None:
    with pytest.raises(RuntimeError, match="exited without its summary line"):
        await _summary_of("pass")
    with pytest.raises(RuntimeError, match="failed with 3"):
        await _summary_of("raise SystemExit(3)")
    with pytest.raises(RuntimeError, match="did not finish in 1s"):
        await _summary_of("import time; time.sleep(10)", limit=1)

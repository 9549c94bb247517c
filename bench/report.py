"""The one table `make bench` prints (markdown), built from the results dict."""

from __future__ import annotations

from typing import Any

from bench.relayrun import shape_differences

TARGETS = {
    "drain_vs_polling": 2.0,  # cdc-relay drain >= 2x the best polling batch size
    "drain_vs_broker": 0.95,  # >= 95% of the like-for-like classic-queue ceiling (issue 20)
    "quorum_drain_vs_broker_quorum": 0.95,  # the same into a quorum queue (issue 20)
    "relay_vs_walsender": 1.0,  # relay CPU per row <= the walsender's, same drain (issue 20)
    "dead_letter_rate_vs_happy": 0.80,  # dead-letter drain >= 80% of the happy one's rate
    "dead_letter_cpu_vs_happy": 2.0,  # ... at <= 2x its CPU per row (issue 20)
    "latency_5000_p99_ms": 5.0,  # commit->confirm p99 at 5,000 rows/s paced (issue 20)
    "latency_2000_p50_ms": 5.0,
    "latency_2000_p99_ms": 25.0,
    "peak_rss_mb": 64.0,  # one 1M-row transaction (issue 20; was 150)
    # Not from the issue (it set no TLS target): a floor that flags a TLS read path
    # gone wrong, as the one-frame-per-wakeup bug did (about 30% of plain).
    "tls_drain_vs_plain": 0.5,
}


def _ok(r: dict[str, Any], key: str) -> bool:
    d = r.get(key)
    return isinstance(d, dict) and bool(d) and "error" not in d and "skipped" not in d


def _rate(d: dict[str, Any], unit: str = "rows/s") -> str:
    key = "msgs_per_s" if "msgs_per_s" in d else "rows_per_s"
    return f"{d[key]:,.0f} {unit} ({d['seconds']:.1f} s)"


def _latency(d: dict[str, Any]) -> str:
    text = ""
    c = d.get("commit_to_confirm") or {}
    if c.get("p99_ms") is not None:
        text = (
            f"commit->confirm p50 {c['p50_ms']:.1f} / p95 {c['p95_ms']:.1f} /"
            f" p99 {c['p99_ms']:.1f} ms ({c.get('share_le_5ms', 0):.1%} <= 5 ms,"
            f" {c.get('share_le_25ms', 0):.1%} <= 25 ms); commit->delivery "
        )
    text += (
        f"p50 {d['p50_ms']:.1f} / p95 {d['p95_ms']:.1f} / p99 {d['p99_ms']:.1f} ms"
        f" (n={d['n']:,}, {d['achieved_rate']:,.0f}/s achieved"
    )
    if d.get("missing"):
        text += f", {d['missing']:,} not delivered"
    if d.get("relay_cores") is not None:
        text += f", relay {d['relay_cores']:.0%} of a core"
    return text + ")"


def _verdict(ok: bool, text: str) -> str:
    return f"{'PASS' if ok else 'MISS'} ({text})"


def _other(d: dict[str, Any]) -> str:
    cpu = d.get("cpu") or {}
    return f"{cpu['other']:.2f}" if "other" in cpu else ""


def ratios(r: dict[str, Any]) -> dict[str, float]:
    """cdc-relay's drain against the peer and the ceilings (1-row transactions), and over
    TLS against plain."""
    out = _drain_ratios(r) if _ok(r, "relay_drain_txn1") else {}
    if _ok(r, "tls"):
        out["tls_drain_vs_plain"] = (
            r["tls"]["tls"]["drain"]["rows_per_s"] / r["tls"]["plain"]["drain"]["rows_per_s"]
        )
    return out


def _drain_ratios(r: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    drain = r["relay_drain_txn1"]["rows_per_s"]
    polls = [r[k]["rows_per_s"] for k in ("polling_b100", "polling_b1000") if _ok(r, k)]
    if polls:
        out["drain_vs_polling"] = drain / max(polls)
    if _ok(r, "broker_classic"):
        out["drain_vs_broker"] = drain / r["broker_classic"]["msgs_per_s"]
    if _ok(r, "relay_drain_quorum") and _ok(r, "broker_quorum"):
        out["quorum_drain_vs_broker_quorum"] = (
            r["relay_drain_quorum"]["rows_per_s"] / r["broker_quorum"]["msgs_per_s"]
        )
    if _ok(r, "pg_ceiling_txn1"):
        out["drain_vs_postgres"] = drain / r["pg_ceiling_txn1"]["rows_per_s"]
    if _ok(r, "relay_drain_txn100") and _ok(r, "pg_ceiling_txn100"):
        out["drain_vs_postgres_txn100"] = (
            r["relay_drain_txn100"]["rows_per_s"] / r["pg_ceiling_txn100"]["rows_per_s"]
        )
    for txn in (1, 100):
        d = r.get(f"relay_drain_txn{txn}") or {}
        if _ok(r, f"relay_drain_txn{txn}") and d.get("walsender_cpu_us_per_row"):
            out[f"relay_vs_walsender_txn{txn}"] = (
                d["cpu_us_per_msg"] / d["walsender_cpu_us_per_row"]
            )
    if _ok(r, "relay_drain_dead_letter"):
        dead, happy = r["relay_drain_dead_letter"], r["relay_drain_txn1"]
        out["dead_letter_rate_vs_happy"] = dead["rows_per_s"] / happy["rows_per_s"]
        out["dead_letter_cpu_vs_happy"] = dead["cpu_us_per_msg"] / happy["cpu_us_per_msg"]
    return out


NOISE_CORES = 0.3  # a ratio whose two sides saw this much different other load is flagged


def _noise(r: dict[str, Any], a: str, b: str) -> str:
    """A warning when the two measurements of a ratio ran under different outside load."""
    other_a = (r.get(a) or {}).get("cpu", {}).get("other")
    other_b = (r.get(b) or {}).get("cpu", {}).get("other")
    if other_a is None or other_b is None or abs(other_a - other_b) < NOISE_CORES:
        return ""
    return f"; unreliable: other load {other_a:.2f} vs {other_b:.2f} cores"


def _best_polling(r: dict[str, Any]) -> str:
    keys = [k for k in ("polling_b100", "polling_b1000") if _ok(r, k)]
    return max(keys, key=lambda k: r[k]["rows_per_s"]) if keys else ""


def verdicts(r: dict[str, Any]) -> dict[str, bool]:
    """PASS/MISS per target (only for what was measured)."""
    out: dict[str, bool] = {}
    ra = ratios(r)
    if "drain_vs_polling" in ra:
        out["drain_vs_polling"] = ra["drain_vs_polling"] >= TARGETS["drain_vs_polling"]
    for key in ("drain_vs_broker", "quorum_drain_vs_broker_quorum", "dead_letter_rate_vs_happy"):
        if key in ra:
            out[key] = ra[key] >= TARGETS[key]
    if "dead_letter_cpu_vs_happy" in ra:
        out["dead_letter_cpu_vs_happy"] = (
            ra["dead_letter_cpu_vs_happy"] <= TARGETS["dead_letter_cpu_vs_happy"]
        )
    for txn in (1, 100):
        if f"relay_vs_walsender_txn{txn}" in ra:
            out[f"relay_vs_walsender_txn{txn}"] = (
                ra[f"relay_vs_walsender_txn{txn}"] <= TARGETS["relay_vs_walsender"]
            )
    if _ok(r, "latency_5000"):
        d = r["latency_5000"]
        c = d.get("commit_to_confirm") or {}
        # p99 <= 5 ms exactly: 5 ms is a bucket edge, so 99% at or under it is exact.
        out["latency_5000"] = (
            bool(c.get("n"))
            and c["n"] >= d["n"]
            and c.get("share_le_5ms", 0) >= 0.99
            and not d.get("missing")
        )
    if _ok(r, "latency_2000"):
        d = r["latency_2000"]
        # The target is commit -> confirm: the relay's own histogram, read off at the
        # 5 ms and 25 ms bucket edges; commit -> delivery when it is missing (older runs).
        c = d.get("commit_to_confirm") or {}
        if c.get("n"):
            ok = (
                c.get("share_le_5ms", 0) > 0.5
                and c.get("share_le_25ms", 0) >= 0.99
                and c["n"] >= d["n"]
            )
        else:
            ok = (
                d["p50_ms"] < TARGETS["latency_2000_p50_ms"]
                and d["p99_ms"] < TARGETS["latency_2000_p99_ms"]
            )
        out["latency_2000"] = ok and not d.get("missing")
    if _ok(r, "peak_rss"):
        out["peak_rss"] = r["peak_rss"]["peak_rss_mb"] <= TARGETS["peak_rss_mb"]
    if "tls_drain_vs_plain" in ra:
        out["tls_drain_vs_plain"] = ra["tls_drain_vs_plain"] >= TARGETS["tls_drain_vs_plain"]
    return out


def table(r: dict[str, Any]) -> str:
    m, s, z = r["machine"], r.get("servers", {}), r["sizes"]
    v = verdicts(r)
    rows: list[tuple[str, str, str, str]] = []

    def add(key: str, label: str, fmt: Any, target: str = "") -> None:
        d = r.get(key)
        if not d:
            return
        if "error" in d:
            rows.append((label, f"FAILED: {d['error'][:120]}", target and "MISS", ""))
            return
        rows.append((label, fmt(d), target, _other(d)))

    n = f"{z['backlog']:,}"
    add("pg_ceiling_txn1", f"Postgres ceiling: pg_recvlogical, {n} rows, 1-row txns", _rate)
    add("pg_ceiling_txn100", f"Postgres ceiling: pg_recvlogical, {n} rows, 100-row txns", _rate)
    add("broker_classic", f"Broker ceiling: {n} msgs, durable classic queue", _msgs)
    add("broker_quorum", f"Broker ceiling: {n} msgs, quorum queue", _msgs)
    for b in (100, 1000):
        add(f"polling_b{b}", f"Polling peer drain, batch {b} ({n} rows)", _polling)
    add(
        "polling_latency_500",
        "Polling peer latency @ 500 rows/s, 100 ms poll, batch 1000",
        _latency,
    )
    add("relay_drain_txn1", f"cdc-relay drain, {n} 1-row txns", _drain)
    add("relay_drain_txn100", f"cdc-relay drain, {n} rows in 100-row txns", _drain)
    add("relay_drain_quorum", f"cdc-relay drain, {n} 1-row txns, into a quorum queue", _drain)
    add(
        "relay_drain_dead_letter",
        f"cdc-relay drain, {n} 1-row txns, no queue bound (every row dead-lettered)",
        _drain,
    )
    for rate in z["rates"]:
        target = ""
        if rate == 2000 and "latency_2000" in v:
            target = _verdict(v["latency_2000"], "p50 < 5 ms, p99 < 25 ms")
        if rate == 5000 and "latency_5000" in v:
            target = _verdict(v["latency_5000"], "commit->confirm p99 <= 5 ms")
        raw = r.get(f"raw_latency_{rate}") or {}
        add(
            f"latency_{rate}",
            f"cdc-relay latency @ {rate:,} rows/s, {z['seconds']:.0f} s",
            lambda d, raw=raw: _latency(d) + _raw_latency(raw),
            target,
        )
    if "peak_rss" in r:
        target = _verdict(v["peak_rss"], "<= 64 MB") if "peak_rss" in v else ""
        add("peak_rss", f"cdc-relay peak RSS, one {z['big']:,}-row txn", _rss, target)
    _multi_rows(r, rows)
    _tls_rows(r, v, add)

    ra = ratios(r)
    if "drain_vs_polling" in ra:
        rows.append(
            (
                "ratio: cdc-relay drain / polling peer (best batch)",
                f"{ra['drain_vs_polling']:.2f}x" + _noise(r, "relay_drain_txn1", _best_polling(r)),
                _verdict(v["drain_vs_polling"], ">= 2x"),
                "",
            )
        )
    if "drain_vs_broker" in ra:
        rows.append(
            (
                "ratio: cdc-relay drain / like-for-like broker ceiling (classic)",
                f"{ra['drain_vs_broker']:.0%}" + _noise(r, "relay_drain_txn1", "broker_classic"),
                _verdict(v["drain_vs_broker"], ">= 95%"),
                "",
            )
        )
    if "quorum_drain_vs_broker_quorum" in ra:
        rows.append(
            (
                "ratio: cdc-relay drain / like-for-like broker ceiling (quorum)",
                f"{ra['quorum_drain_vs_broker_quorum']:.0%}"
                + _noise(r, "relay_drain_quorum", "broker_quorum"),
                _verdict(v["quorum_drain_vs_broker_quorum"], ">= 95%"),
                "",
            )
        )
    rows.extend(_like_for_like(r))
    for txn in (1, 100):
        key = f"relay_vs_walsender_txn{txn}"
        if key in ra:
            d = r[f"relay_drain_txn{txn}"]
            rows.append(
                (
                    f"ratio: relay CPU per row / walsender CPU per row, {txn}-row txns",
                    f"relay {d['cpu_us_per_msg']:.1f} µs, walsender"
                    f" {d['walsender_cpu_us_per_row']:.1f} µs: **{ra[key]:.1f}x**",
                    _verdict(v[key], "relay <= walsender"),
                    "",
                )
            )
    if "dead_letter_rate_vs_happy" in ra:
        dead, happy = r["relay_drain_dead_letter"], r["relay_drain_txn1"]
        rows.append(
            (
                "ratio: dead-letter drain rate / happy drain rate",
                f"{dead['rows_per_s']:,.0f} / {happy['rows_per_s']:,.0f} rows/s ="
                f" {ra['dead_letter_rate_vs_happy']:.0%}"
                + _noise(r, "relay_drain_dead_letter", "relay_drain_txn1"),
                _verdict(v["dead_letter_rate_vs_happy"], ">= 80%"),
                "",
            )
        )
        rows.append(
            (
                "ratio: dead-letter CPU per row / happy CPU per row",
                f"{dead['cpu_us_per_msg']:.0f} / {happy['cpu_us_per_msg']:.0f} µs ="
                f" {ra['dead_letter_cpu_vs_happy']:.1f}x",
                _verdict(v["dead_letter_cpu_vs_happy"], "<= 2x"),
                "",
            )
        )
    if "drain_vs_postgres" in ra:
        txn100 = ra.get("drain_vs_postgres_txn100")
        rows.append(
            (
                "ratio: cdc-relay drain / Postgres ceiling",
                f"{ra['drain_vs_postgres']:.0%} (1-row txns)"
                + (f", {txn100:.0%} (100-row txns)" if txn100 else ""),
                "",
                "",
            )
        )

    load = " / ".join(m["loadavg_at_start"])
    head = [
        f"cdc-relay bench, {r['started']} ({'QUICK run' if r['quick'] else 'full run'}"
        f"{', INTERRUPTED' if r.get('interrupted') else ''},"
        f" {r.get('seconds', 0) / 60:.1f} min, code {r.get('code', '?')})",
        f"machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB RAM, Linux {m['kernel']},"
        f" Python {m['python']}; load average at start {load}",
        f"servers: throwaway and co-located on this machine, loopback only: PostgreSQL"
        f" {s.get('postgres', '?')} ({s.get('postgres_settings', '?')}), RabbitMQ"
        f" {s.get('rabbitmq', '?')} on Erlang/OTP {s.get('erlang', '?')}",
        "messages: 300-byte JSON payloads, persistent, publisher confirms; cdc-relay with"
        f" default settings (--max-in-flight {r.get('relay_max_in_flight', '?')})",
        "",
        "| measurement | result | target | other load |",
        "|---|---|---|---|",
    ]
    body = [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    notes = [
        "",
        "drain: from the relay answering /readyz (streaming) to the slot's confirmed_flush_lsn"
        " reaching the last commit; startup is listed in the JSON. latency: commit->confirm is"
        " the relay's cdc_relay_commit_to_confirm_seconds histogram (per transaction, the"
        " commit timestamp from Postgres to the broker's confirm of its last message;"
        " quantiles interpolated inside buckets, the shares at 5 and 25 ms exact; the target"
        " is judged on it); commit->delivery is COMMIT returned in the writer -> message"
        " received by a consumer process. other load: average cores used by processes"
        " outside this bench and its servers while the step ran (the machine is shared)."
        " TLS: Postgres with sslmode=verify-full and amqps with cacertfile (trustme"
        " certificates, a TLS-only server of each kind), against this bench's plain servers"
        " measured the same way in the same step (drain, then paced writer and bursts)."
        " Its latency is the commit->confirm histogram only.",
    ]
    return "\n".join(head + body + notes)


def _msgs(d: dict[str, Any]) -> str:
    text = f"{_rate(d, 'msg/s')}, window {d['window']:,}"
    runs = [
        f"{x:,.0f} (window {w:,})"
        for x, w in zip(d.get("runs_msgs_per_s", []), d.get("runs_windows", []), strict=False)
        if x
    ]
    if len(runs) > 1:
        text += f"; best of the runs before and after the drain: {', '.join(runs)}"
    return text


def _polling(d: dict[str, Any]) -> str:
    return f"{_rate(d)}, {d['cpu_us_per_msg']:.0f} µs CPU/msg"


def _drain(d: dict[str, Any]) -> str:
    text = (
        f"{_rate(d)}, {d['cpu_us_per_msg']:.0f} µs CPU/msg, relay {d['relay_cores']:.0%} of a core"
    )
    if "walsender_cpu_us_per_row" in d:
        text += f"; walsender {d['walsender_cpu_us_per_row']:.1f} µs CPU/row"
    return text


def _raw_latency(d: dict[str, Any]) -> str:
    """The raw publisher's own publish->confirm at the same rate, same run."""
    if not d:
        return ""
    if "error" in d:
        return f"; raw publisher FAILED: {d['error'][:80]}"
    return (
        f"; raw publisher publish->confirm p50 {d['p50_ms']:.1f} / p99 {d['p99_ms']:.1f} ms"
        f" ({d['achieved_rate']:,.0f}/s)"
    )


def _like_for_like(r: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """Whether the ceiling's message matches one the relay published in this run."""
    relay, ceiling = r.get("relay_message"), r.get("ceiling_message")
    if not relay or not ceiling:
        return []
    diffs = shape_differences(relay, ceiling)
    text = (
        "same route, properties, header names and types, body size (and mandatory)"
        if not diffs
        else "DIFFERENT: " + "; ".join(diffs)
    )
    return [("check: ceiling message vs a message the relay published", text, "", "")]


def _multi_rows(r: dict[str, Any], rows: list[tuple[str, str, str, str]]) -> None:
    """Several outboxes on one slot vs one slot each (no target: what it costs)."""
    m = r.get("multi_outbox")
    if not m:
        return
    if "skipped" in m:
        rows.append(("several outboxes on one slot", f"skipped: {m['skipped']}", "", ""))
        return
    if "error" in m:
        rows.append(("several outboxes on one slot", f"FAILED: {m['error'][:120]}", "", ""))
        return
    for count in r["sizes"].get("multi_outboxes", []):
        parts = []
        for kind in ("shared", "separate"):
            d = m.get(f"{count}_{kind}")
            if d:
                parts.append(
                    f"{'one slot, one relay' if kind == 'shared' else 'a slot and relay each'}:"
                    f" {d['rows_per_s']:,.0f} rows/s, relay {d['cpu_us_per_msg']:.1f} µs/row,"
                    f" walsender {d['walsender_cpu_us_per_row']:.1f} µs/row"
                )
        rows.append(
            (
                f"{count} outboxes x {m['rows_per_table']:,} 1-row txns",
                "; ".join(parts),
                "",
                _other(m),
            )
        )


def _rss(d: dict[str, Any]) -> str:
    return (
        f"{d['peak_rss_mb']:.0f} MB VmHWM ({d['rows']:,} rows relayed at"
        f" {d['rows_per_s']:,.0f} rows/s)"
    )


def _tls_rows(r: dict[str, Any], v: dict[str, bool], add: Any) -> None:
    """Drain and latency over TLS, each next to the plain baseline measured in the same step."""
    d = r.get("tls")
    if not d:
        return
    t = d.get("sizes") or {}
    label = d.get("label", "verify-full / amqps")
    # No target was set for TLS: only a drain under half of plain is marked.
    target = "" if v.get("tls_drain_vs_plain", True) else "MISS (>= 50% of plain)"
    rows = f", {t['rows']:,} 1-row txns" if "rows" in t else ""
    add("tls", f"cdc-relay drain over TLS ({label}){rows}", _tls_drain, target)
    if "error" not in d:
        add(
            "tls",
            f"cdc-relay latency over TLS @ {t['rate']:,} rows/s, {t['seconds']:.0f} s,"
            f" and in {t['bursts']} bursts of {t['burst']} commits",
            _tls_latency,
        )


def _tls_drain(d: dict[str, Any]) -> str:
    t, p = d["tls"]["drain"], d["plain"]["drain"]
    return (
        f"{t['rows_per_s']:,.0f} rows/s, {t['cpu_us_per_msg']:.0f} µs CPU/msg;"
        f" plain {p['rows_per_s']:,.0f} rows/s, {p['cpu_us_per_msg']:.0f} µs"
        f" ({t['rows_per_s'] / p['rows_per_s']:.0%})"
    )


def _tls_latency(d: dict[str, Any]) -> str:
    def both(x: dict[str, Any]) -> str:
        paced, bursts = x["latency"]["paced"], x["latency"]["bursts"]
        return (
            f"p50 {paced['p50_ms']:.1f} / p99 {paced['p99_ms']:.1f} ms paced,"
            f" {bursts['p50_ms']:.1f} / {bursts['p99_ms']:.1f} ms in bursts"
        )

    return f"commit->confirm {both(d['tls'])}; plain {both(d['plain'])}"

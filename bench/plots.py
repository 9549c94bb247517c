"""PNG plots of one bench run, written next to docs/performance.md (matplotlib, Agg).

Three figures: drain rates against both ceilings and the polling peer; relay
CPU per row against the walsender's; latency CDFs per rate (the relay's
commit->confirm next to the raw publisher's publish->confirm; commit->delivery
is left out, as its two clocks sit in two processes that a busy machine
delays differently, see docs/performance.md). Without
matplotlib (the ``bench`` extra) nothing is drawn and one line says so: the
plots never fail the bench.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from bench.env import log

FILES = ("drain-rates.png", "cpu-per-row.png", "latency-cdf.png")


def _ok(r: dict[str, Any], key: str) -> bool:
    d = r.get(key)
    return isinstance(d, dict) and bool(d) and "error" not in d and "skipped" not in d


def drain_bars(r: dict[str, Any]) -> list[tuple[str, float]]:
    """(label, rows or messages per second) for the drain figure, in reading order."""
    bars: list[tuple[str, float]] = []
    for key, label in (
        ("pg_ceiling_txn1", "Postgres ceiling\n(pg_recvlogical)"),
        ("broker_classic", "broker ceiling\nclassic"),
        ("relay_drain_txn1", "cdc-relay\nclassic"),
        ("relay_drain_dead_letter", "cdc-relay\ndead letters"),
        ("broker_quorum", "broker ceiling\nquorum"),
        ("relay_drain_quorum", "cdc-relay\nquorum"),
        ("polling_b100", "polling peer\nbatch 100"),
        ("polling_b1000", "polling peer\nbatch 1000"),
    ):
        if _ok(r, key):
            d = r[key]
            bars.append((label, float(d.get("rows_per_s", d.get("msgs_per_s", 0.0)))))
    return bars


def cpu_pairs(r: dict[str, Any]) -> list[tuple[str, float, float]]:
    """(label, relay µs per row, walsender µs per row) for every drain that measured both."""
    pairs: list[tuple[str, float, float]] = []
    for key, label in (
        ("relay_drain_txn1", "1-row txns\nclassic"),
        ("relay_drain_txn100", "100-row txns\nclassic"),
        ("relay_drain_quorum", "1-row txns\nquorum"),
        ("relay_drain_dead_letter", "1-row txns\ndead letters"),
    ):
        if _ok(r, key) and "walsender_cpu_us_per_row" in r[key]:
            d = r[key]
            pairs.append((label, d["cpu_us_per_msg"], d["walsender_cpu_us_per_row"]))
    multi = r.get("multi_outbox")
    if isinstance(multi, dict) and "error" not in multi:
        for key, d in sorted(multi.items()):
            if isinstance(d, dict) and "walsender_cpu_us_per_row" in d:
                pairs.append(
                    (
                        f"{d['outboxes']} outboxes\n{key.split('_', 1)[1]}",
                        d["cpu_us_per_msg"],
                        d["walsender_cpu_us_per_row"],
                    )
                )
    return pairs


def latency_curves(r: dict[str, Any]) -> dict[int, list[tuple[str, list[list[float]]]]]:
    """Per rate: (label, [[ms, share], ...]) for each latency measured at that rate."""
    curves: dict[int, list[tuple[str, list[list[float]]]]] = {}
    for rate in r.get("sizes", {}).get("rates", []):
        found: list[tuple[str, list[list[float]]]] = []
        if _ok(r, f"latency_{rate}"):
            d = r[f"latency_{rate}"]
            confirm = (d.get("commit_to_confirm") or {}).get("cdf")
            if confirm:
                found.append(("cdc-relay commit->confirm (histogram buckets)", _upto_all(confirm)))
        if _ok(r, f"raw_latency_{rate}") and r[f"raw_latency_{rate}"].get("cdf"):
            found.append(("raw publisher publish->confirm", r[f"raw_latency_{rate}"]["cdf"]))
        if found:
            curves[rate] = found
    return curves


def _upto_all(points: list[list[float]]) -> list[list[float]]:
    """Histogram points up to the first bucket that holds everything (the rest is flat)."""
    for i, (_, share) in enumerate(points):
        if share >= 1.0:
            return points[: i + 1]
    return points


def write_plots(r: dict[str, Any], out_dir: Path) -> list[str] | str:
    """Write the PNGs; their paths, or one line saying why none were drawn."""
    if importlib.util.find_spec("matplotlib") is None:
        line = "plots: not drawn, matplotlib is not installed (pip install -e '.[bench]')"
        log(line)
        return line
    try:
        return _draw(r, out_dir)
    except Exception as exc:  # a plot must never cost the run its results
        line = f"plots: not drawn ({type(exc).__name__}: {exc})"
        log(line)
        return line


def _draw(r: dict[str, Any], out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    title = f"{r.get('started', '')}, code {r.get('code', '?')}" + (
        " (quick run)" if r.get("quick") else ""
    )

    bars = drain_bars(r)
    if bars:
        fig, ax = plt.subplots(figsize=(10, 4.5))
        colors = [
            "tab:blue" if "cdc-relay" in label else "tab:gray" if "ceiling" in label else "tab:red"
            for label, _ in bars
        ]
        ax.bar([b[0] for b in bars], [b[1] for b in bars], color=colors)
        for i, (_, value) in enumerate(bars):
            ax.annotate(f"{value:,.0f}", (i, value), ha="center", va="bottom", fontsize=8)
        ax.set_ylabel("rows (messages) per second")
        ax.set_title(f"Backlog drain against the ceilings and the polling peer\n{title}")
        ax.tick_params(axis="x", labelsize=8)
        written.append(_save(fig, out_dir / FILES[0]))

    pairs = cpu_pairs(r)
    if pairs:
        fig, ax = plt.subplots(figsize=(10, 4.5))
        xs = range(len(pairs))
        ax.bar([x - 0.2 for x in xs], [p[1] for p in pairs], 0.4, label="cdc-relay")
        ax.bar([x + 0.2 for x in xs], [p[2] for p in pairs], 0.4, label="walsender (Postgres)")
        for x, (_, relay, wal) in zip(xs, pairs, strict=True):
            ratio = f"{relay / wal:.1f}x" if wal else "-"
            ax.annotate(ratio, (x, max(relay, wal)), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(xs), [p[0] for p in pairs], fontsize=8)
        ax.set_ylabel("CPU µs per row (same drain window)")
        ax.set_title(f"CPU per row: the relay against the walsender decoding the slot\n{title}")
        ax.legend()
        written.append(_save(fig, out_dir / FILES[1]))

    curves = latency_curves(r)
    if curves:
        fig, axes = plt.subplots(
            1, len(curves), figsize=(5 * len(curves), 4.2), squeeze=False, sharey=True
        )
        for ax, (rate, found) in zip(axes[0], sorted(curves.items()), strict=True):
            for label, points in found:
                xs_ms = [max(p[0], 0.01) for p in points]
                ax.step(xs_ms, [p[1] for p in points], where="post", label=label)
            ax.axvline(5.0, color="black", linestyle=":", linewidth=1)
            ax.axhline(0.99, color="black", linestyle=":", linewidth=1)
            ax.set_xscale("log")
            ax.set_xlabel("milliseconds (log scale)")
            ax.set_title(f"{rate:,} rows/s")
            ax.legend(fontsize=7, loc="best")
        axes[0][0].set_ylabel("share of transactions / messages")
        fig.suptitle(f"Latency CDFs per rate (dotted: 5 ms, 99%)\n{title}", fontsize=10)
        written.append(_save(fig, out_dir / FILES[2]))
    log(f"plots written: {', '.join(written) if written else 'none (nothing measured)'}")
    return written


def _save(fig: Any, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return str(path)

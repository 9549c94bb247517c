"""Read the relay's HTTP endpoints: /metrics (parsed by prometheus_client), /readyz.

The standard library's urllib is the client (tests and the benchmark only ask
a loopback port for a page); the async wrappers run it in a thread so an
event loop with consumers and proxies on it is never blocked.
"""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

__all__ = [
    "get",
    "histogram",
    "histogram_buckets",
    "metrics_text",
    "parse_histogram",
    "readyz",
    "role",
]


def get(port: int, path: str, timeout: float = 5) -> tuple[int, str]:
    """Status code and body of ``GET path`` on 127.0.0.1:port; (0, "") if nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as resp:
            return int(resp.status), resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except OSError:
        return 0, ""


def readyz(port: int) -> int:
    """The status of /readyz: 200 healthy in its role (active or standby), 503 not, 0 when
    nothing answers."""
    return get(port, "/readyz", timeout=2)[0]


def role(port: int) -> str | None:
    """The relay's role (``cdc_relay_role`` at 1: active, standby, starting); None if unknown."""
    status, body = get(port, "/metrics", timeout=2)
    if status != 200:
        return None
    for family in text_string_to_metric_families(body):
        if family.name == "cdc_relay_role":
            for sample in family.samples:
                if sample.value == 1:
                    return sample.labels["role"]
    return None


async def metrics_text(port: int) -> str:
    """The relay's /metrics page (the body only)."""
    status, body = await asyncio.to_thread(get, port, "/metrics", 10)
    if status != 200:
        raise RuntimeError(f"/metrics on port {port} answered {status or 'nothing'}")
    return body


def parse_histogram(text: str, name: str) -> dict[str, float]:
    """The buckets (keyed by the ``le`` label text), ``count`` and ``sum`` of one histogram."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == name:
            for sample in family.samples:
                key = sample.labels.get("le") or sample.name.rsplit("_", 1)[1]
                found[key] = sample.value
    return found


def histogram_buckets(text: str, name: str) -> dict[float, float]:
    """Cumulative bucket counts of one histogram: upper bound in seconds -> count."""
    return {
        float(sample.labels["le"]): sample.value
        for family in text_string_to_metric_families(text)
        if family.name == name
        for sample in family.samples
        if sample.name == name + "_bucket"
    }


async def histogram(port: int, name: str) -> dict[float, float]:
    """Scrape /metrics and return one histogram's cumulative buckets."""
    return histogram_buckets(await metrics_text(port), name)

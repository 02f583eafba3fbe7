"""The monitor's own Prometheus metrics: each rule's current value, for teams that alert
in Prometheus (``loopline alerts export-prometheus`` writes rules on these gauges).

Series, labelled ``rule, metric, environment, model, version, scope``:

- ``loopline_monitor_metric``: the rule's value over its window. Absent while the window
  holds fewer than ``min_samples`` (no-data), so Prometheus sees no-data as no series.
- ``loopline_monitor_resolve_metric``: the value over the rule's ``resolve_window`` when it
  differs from ``window`` (what hysteresis resolves on).
- ``loopline_monitor_samples``: the samples in the window.

And ``loopline_monitor_last_pass_timestamp_seconds`` / ``loopline_monitor_passes_total``,
so a stalled monitor is seen too.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from loopline.monitor.types import Measurement

METRIC = "loopline_monitor_metric"
RESOLVE_METRIC = "loopline_monitor_resolve_metric"
SAMPLES = "loopline_monitor_samples"
LAST_PASS = "loopline_monitor_last_pass_timestamp_seconds"
PASSES = "loopline_monitor_passes"  # exposed as loopline_monitor_passes_total
LABELS: tuple[str, ...] = ("rule", "metric", "environment", "model", "version", "scope")
CONTENT_TYPE = CONTENT_TYPE_LATEST

Key = tuple[str, str, str, str, str, str]


class MonitorMetrics:
    """A registry of the monitor's gauges, updated after every pass, safe across threads."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._lock = threading.Lock()
        self._series: dict[Key, tuple[float | None, float | None, int]] = {}
        self._last_pass: float | None = None
        self._passes = 0
        self.registry.register(_Collector(self))

    def update(
        self,
        results: Iterable[tuple[str, Measurement]],
        *,
        complete: bool = True,
        now: float | None = None,
    ) -> None:
        """Record ``(rule name, measurement)`` pairs.

        With ``complete`` (one whole pass's measurements), every series not among them is
        dropped (a version no longer served, a scope gone) and the pass is counted;
        without it, the pairs are added to or replace what is there.
        """
        fresh: dict[Key, tuple[float | None, float | None, int]] = {}
        for rule, m in results:
            key: Key = (
                rule,
                m.metric,
                m.environment,
                m.model_name,
                "" if m.model_version is None else str(m.model_version),
                m.scope,
            )
            resolve = m.evidence.get("resolve_value") if m.value is not None else None
            fresh[key] = (
                m.value,
                float(resolve) if isinstance(resolve, int | float) else None,
                int(m.samples),
            )
        with self._lock:
            if complete:
                self._series = fresh
                self._last_pass = time.time() if now is None else now
                self._passes += 1
            else:
                self._series.update(fresh)

    def snapshot(self) -> dict[Key, tuple[float | None, float | None, int]]:
        with self._lock:
            return dict(self._series)

    def render(self) -> bytes:
        """The text exposition format, as ``/metrics`` serves it."""
        return generate_latest(self.registry)

    def serve(self, port: int, addr: str = "127.0.0.1") -> Any:
        """Serve ``/metrics`` on ``addr:port`` in a daemon thread; returns the server (its
        ``server_port`` is the port when 0 was given; ``shutdown()`` stops it). Pass
        ``addr="0.0.0.0"`` for a Prometheus on another host."""
        from prometheus_client import start_http_server

        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return server


class _Collector:
    def __init__(self, owner: MonitorMetrics) -> None:
        self.owner = owner

    def collect(self) -> Iterator[Metric]:
        with self.owner._lock:
            series = dict(self.owner._series)
            last_pass, passes = self.owner._last_pass, self.owner._passes
        value = GaugeMetricFamily(METRIC, "a rule's metric over its window", labels=LABELS)
        resolve = GaugeMetricFamily(
            RESOLVE_METRIC, "a rule's metric over its resolve window", labels=LABELS
        )
        samples = GaugeMetricFamily(SAMPLES, "samples in a rule's window", labels=LABELS)
        for key, (v, r, n) in sorted(series.items()):
            if v is not None:
                value.add_metric(list(key), v)
            if r is not None:
                resolve.add_metric(list(key), r)
            samples.add_metric(list(key), n)
        yield value
        yield resolve
        yield samples
        last = GaugeMetricFamily(LAST_PASS, "when the monitor's last pass ended (unix time)")
        if last_pass is not None:
            last.add_metric([], last_pass)
        yield last
        total = CounterMetricFamily(PASSES, "monitoring passes completed")
        total.add_metric([], passes)
        yield total


METRICS = MonitorMetrics()


def update(results: Iterable[tuple[str, Measurement]], *, complete: bool = True) -> None:
    """``METRICS.update``: the process's monitor metrics."""
    METRICS.update(results, complete=complete)


def render() -> bytes:
    """``METRICS.render()``."""
    return METRICS.render()


def serve(port: int, addr: str = "127.0.0.1") -> Any:
    """``METRICS.serve(port, addr)``."""
    return METRICS.serve(port, addr)

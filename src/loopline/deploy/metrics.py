"""Prometheus metrics of a prediction server, labelled by model and version.

Request counters and latency come from a pure ASGI middleware (every endpoint, 4xx and 5xx
included); batch sizes, predictions per class and confidence are observed once per batch
on the batcher thread, so the request path pays for two observations only. Children of
labelled metrics are bound once and cached: no label lookup per request.

With several worker processes, ``PROMETHEUS_MULTIPROC_DIR`` names a folder where every
worker writes its values and ``/metrics`` adds them up. The folder belongs to the server:
``prepare_multiprocess_dir`` empties it at start (the values of an earlier run would
otherwise be counted again), and the supervisor drops a dead worker's live gauges.
"""

from __future__ import annotations

import copy
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from loopline.errors import ConfigError

LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CONFIDENCE_BUCKETS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# The files prometheus_client writes: counter_123.db, gauge_livesum_123.db, ...
_METRIC_FILE = re.compile(r"[a-z]+(_[a-z]+)?_\d+\.db")


def multiprocess_dir() -> Path | None:
    """The folder of Prometheus' multiprocess mode, if it is on."""
    value = os.environ.get(MULTIPROC_ENV)
    return Path(value) if value else None


def prepare_multiprocess_dir() -> tuple[Path, bool]:
    """The multiprocess folder, emptied of an earlier run's files; set in the environment.

    Without ``PROMETHEUS_MULTIPROC_DIR`` a new private folder is made (second value True:
    the caller removes it at the end). A given folder must hold metric files only, since
    they are deleted: it belongs to this server alone.
    """
    given = multiprocess_dir()
    if given is None:
        path = Path(tempfile.mkdtemp(prefix="loopline-prom-"))
        os.environ[MULTIPROC_ENV] = str(path)
        return path, True
    given.mkdir(parents=True, exist_ok=True)
    entries = list(given.iterdir())
    foreign = [e.name for e in entries if not (e.is_file() and _METRIC_FILE.fullmatch(e.name))]
    if foreign:
        raise ConfigError(
            f"{MULTIPROC_ENV} {given} holds files that are not metrics ({', '.join(foreign[:3])}); "
            "give the server an empty folder of its own: it deletes the metric files there"
        )
    for entry in entries:
        entry.unlink(missing_ok=True)
    return given, False


def mark_process_dead(pid: int) -> None:
    """Forget a dead worker's live gauges (its counters still count in the totals)."""
    from prometheus_client import multiprocess

    path = multiprocess_dir()
    if path is not None:
        multiprocess.mark_process_dead(pid, str(path))


class ServerMetrics:
    """The metrics of one served model version."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model: str, version: int | str, labels: list[str]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        mv = ("model", "version")
        self._mv = (model, str(version))
        self.requests = Counter(
            "loopline_requests",
            "HTTP requests by endpoint and status code",
            [*mv, "endpoint", "code"],
            registry=r,
        )
        self.errors = Counter(
            "loopline_request_errors",
            "HTTP requests answered with a 4xx or 5xx status",
            [*mv, "endpoint", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "loopline_request_duration_seconds",
            "time from request to response",
            [*mv, "endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "loopline_batch_size", "images per model run", mv, buckets=BATCH_BUCKETS, registry=r
        )
        self.inference = Histogram(
            "loopline_inference_duration_seconds",
            "time of one model run (a batch)",
            mv,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.predictions = Counter(
            "loopline_predictions", "predictions by predicted class", [*mv, "label"], registry=r
        )
        self.confidence = Histogram(
            "loopline_prediction_confidence",
            "confidence of the predicted class",
            mv,
            buckets=CONFIDENCE_BUCKETS,
            registry=r,
        )
        self.log_written = Counter(
            "loopline_prediction_log_written_rows", "prediction rows stored", mv, registry=r
        )
        self.log_dropped = Counter(
            "loopline_prediction_log_dropped_rows",
            "prediction rows dropped because the store was unreachable too long",
            mv,
            registry=r,
        )
        self.log_spilled = Counter(
            "loopline_prediction_log_spilled_rows",
            "prediction rows written to the spill file after repeated write failures",
            mv,
            registry=r,
        )
        self.process_predictions = Gauge(
            "loopline_process_predictions",
            "predictions made by this server process (with several workers: one series "
            "per live worker, labelled by pid)",
            mv,
            registry=r,
            multiprocess_mode="liveall",
        )
        self.log_pending = Gauge(
            "loopline_prediction_log_pending_rows",
            "prediction rows waiting to be stored",
            mv,
            registry=r,
            multiprocess_mode="livesum",
        )
        self._batch = self.batch_size.labels(*self._mv)
        self._inference = self.inference.labels(*self._mv)
        self._confidence = self.confidence.labels(*self._mv)
        self._per_class = [self.predictions.labels(*self._mv, label) for label in labels]
        self._written = self.log_written.labels(*self._mv)
        self._dropped = self.log_dropped.labels(*self._mv)
        self._spilled = self.log_spilled.labels(*self._mv)
        self._process_predictions = self.process_predictions.labels(*self._mv)
        self._pending = self.log_pending.labels(*self._mv)
        self._request_children: dict[tuple[str, int], tuple[Any, Any, Any]] = {}

    def for_version(self, model: str, version: int | str, labels: list[str]) -> ServerMetrics:
        """These metrics with batch observations labelled by another served version (an
        environment serves several); request and log counters stay this object's."""
        view = copy.copy(self)
        mv = view._mv = (model, str(version))
        view._batch = self.batch_size.labels(*mv)
        view._inference = self.inference.labels(*mv)
        view._confidence = self.confidence.labels(*mv)
        view._per_class = [self.predictions.labels(*mv, label) for label in labels]
        view._process_predictions = self.process_predictions.labels(*mv)
        return view

    def relabel(self, model: str) -> None:
        """Label request and prediction-log metrics by ``model`` from now on: a server of
        an environment learns the model it serves only once the reconciler loads it."""
        if self._mv[0] == model:
            return
        mv = self._mv = (model, self._mv[1])
        self._written = self.log_written.labels(*mv)
        self._dropped = self.log_dropped.labels(*mv)
        self._spilled = self.log_spilled.labels(*mv)
        self._pending = self.log_pending.labels(*mv)
        self._request_children = {}  # bound again, under the new label, on first use

    # -- observations -----------------------------------------------------------------------
    def observe_request(self, endpoint: str, code: int, seconds: float) -> None:
        children = self._request_children.get((endpoint, code))
        if children is None:
            children = (
                self.requests.labels(*self._mv, endpoint, str(code)),
                self.errors.labels(*self._mv, endpoint, str(code)) if code >= 400 else None,
                self.latency.labels(*self._mv, endpoint),
            )
            self._request_children[(endpoint, code)] = children
        children[0].inc()
        if children[1] is not None:
            children[1].inc()
        children[2].observe(seconds)

    def observe_batch(
        self, n_images: int, seconds: float, top: np.ndarray, conf: np.ndarray
    ) -> None:
        self._batch.observe(n_images)
        self._inference.observe(seconds)
        self._process_predictions.inc(n_images)
        for index, count in enumerate(np.bincount(top, minlength=len(self._per_class)).tolist()):
            if count:
                self._per_class[index].inc(count)
        observe_many(self._confidence, conf)

    def log_rows_written(self, n: int) -> None:
        self._written.inc(n)

    def log_rows_dropped(self, n: int) -> None:
        self._dropped.inc(n)

    def log_rows_spilled(self, n: int) -> None:
        self._spilled.inc(n)

    def set_log_pending(self, n: int) -> None:
        self._pending.set(n)

    def render(self) -> bytes:
        if os.environ.get(MULTIPROC_ENV):
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)


def observe_many(histogram: Any, values: np.ndarray) -> None:
    """``histogram.observe(v)`` for every value, in one write per bucket hit and one to the
    sum (each write takes a lock, and in multiprocess mode goes to a memory-mapped file)."""
    bounds = getattr(histogram, "_upper_bounds", None)
    if bounds is None or len(values) < 2:  # not the prometheus_client this was written for
        for v in values.tolist():
            histogram.observe(v)
        return
    values = np.asarray(values, dtype=np.float64)
    # The first bucket whose bound is >= the value, as Histogram.observe picks it; a NaN
    # falls in no bucket (its comparisons are false) but is added to the sum, as there.
    index = np.searchsorted(np.asarray(bounds, dtype=np.float64), values, side="left")
    histogram._sum.inc(float(values.sum()))
    for i, count in enumerate(np.bincount(index, minlength=len(bounds) + 1).tolist()[:-1]):
        if count:
            histogram._buckets[i].inc(count)


class MetricsMiddleware:
    """Count every HTTP request and time it, labelled by route template and status code."""

    def __init__(self, app: Any, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_status(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            self.metrics.observe_request(endpoint, status, time.perf_counter() - start)

"""Production capture: request images kept for retraining, off the request path.

The predict routes ``offer`` each answered request's images with their prediction ids.
Offering costs a sample draw, a size check and a queue put: it never blocks, never fails
a request, and never touches a store. A sampled image (``capture_sample_rate``, only
images of at most ``capture_max_image_bytes``) waits in a bounded queue (images and bytes);
when the queue is full it is dropped and counted. A background thread records the capture
rows of a batch, linked to their prediction ids, in one write, then stores each image
content-addressed in the artifact store (the same bytes once; without an fsync each: a
crash may lose a capture, never serve a wrong one, as every read verifies the sha256). A
store that fails is retried a few times, then the batch is dropped and counted (rows whose
image could not be stored are deleted again). ``stop`` drains the queue.

Retention is applied by the server itself: with ``purge_interval_s`` set, a second thread
runs the purge (``purge_captures``: past retention, over the size cap, unless a dataset
version references them) at start and then every interval. Several replicas may do so at
once: the purge is one serialised transaction under the store's lock, so the second finds
nothing left to delete.

Counters (on the server's Prometheus registry, so ``/metrics`` shows them):
``loopline_capture_images_total``, ``loopline_capture_bytes_total``,
``loopline_capture_dropped_images_total{reason=queue_full|store_error}`` and
``loopline_capture_skipped_images_total{reason=too_large}``.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from loopline.digest import sha256_bytes
from loopline.errors import ConfigError

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from loopline.deploy.metrics import ServerMetrics
    from loopline.deploy.runtime import ServedModel
    from loopline.deploy.settings import ServeSettings
    from loopline.drivers.artifacts.store import ArtifactStore
    from loopline.drivers.metadata.captures import CaptureRepository, PurgeResult
    from loopline.drivers.metadata.store import MetadataStore

log = logging.getLogger("loopline.deploy")

PNG = b"\x89PNG\r\n\x1a\n"
JPEG = b"\xff\xd8\xff"


def sniff_media_type(data: bytes, given: str | None = None) -> str:
    """The image's media type from its first bytes (what it is, not what it claimed)."""
    if data.startswith(PNG):
        return "image/png"
    if data.startswith(JPEG):
        return "image/jpeg"
    return given or "application/octet-stream"


@dataclass(slots=True)
class _Item:
    prediction_id: str
    data: bytes
    media_type: str | None
    at: datetime


_STOP = object()


class NoCapture:
    """Capture switched off: offering costs one method call."""

    enabled = False

    def offer(self, ids: Sequence[str], images: Sequence[bytes], media_types: Any = None) -> int:
        return 0

    def start(self) -> None:
        pass

    def stop(self, timeout: float = 30.0) -> None:
        pass


NO_CAPTURE = NoCapture()


class CaptureWriter:
    """Stores sampled request images and their capture rows on a background thread."""

    enabled = True

    def __init__(
        self,
        artifacts: ArtifactStore,
        captures: CaptureRepository,
        *,
        sample_rate: float = 1.0,
        max_image_bytes: int = 1 << 20,
        retention_days: float = 30.0,
        max_queue: int = 1024,
        max_queue_bytes: int = 64 << 20,
        environment: str | None = None,
        attempts: int = 3,
        retry_delay_s: float = 0.05,
        max_batch: int = 256,
        registry: CollectorRegistry | None = None,
        labels: tuple[str, str] = ("", ""),
        purge_interval_s: float = 0.0,
        max_total_bytes: int | None = None,
    ) -> None:
        self.artifacts = artifacts
        self.captures = captures
        self.sample_rate = sample_rate
        self.max_image_bytes = max_image_bytes
        self.retention = timedelta(days=retention_days)
        self.max_queue_bytes = max_queue_bytes
        self.environment = environment
        self.attempts = max(1, attempts)
        self.retry_delay_s = retry_delay_s
        self.max_batch = max_batch
        self.purge_interval_s = purge_interval_s  # 0: the server never purges by itself
        self.max_total_bytes = max_total_bytes
        self._purger: threading.Thread | None = None
        self.purges = 0  # purges run, and the captures they deleted
        self.purged = 0
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_queue)
        self._random = random.Random()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._queued_bytes = 0
        self._pending = 0  # offered and not yet stored or dropped
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._accepting = False
        # Plain counts (for tests and ``stats``), mirrored in Prometheus counters.
        self.captured = 0
        self.captured_bytes = 0
        self.dropped: dict[str, int] = {"queue_full": 0, "store_error": 0}
        self.skipped: dict[str, int] = {"too_large": 0}
        self._counters = _Counters(registry, labels) if registry is not None else None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._accepting = True
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="loopline-capture", daemon=True)
        self._thread.start()
        if self.purge_interval_s > 0:
            self._purger = threading.Thread(
                target=self._purge_every, name="loopline-capture-purge", daemon=True
            )
            self._purger.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting, store what is queued, end the threads."""
        self._accepting = False
        self._stopping.set()
        with contextlib.suppress(queue.Full):  # else the thread sees the event once dry
            self._queue.put_nowait(_STOP)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._purger is not None:
            self._purger.join(timeout)
            self._purger = None

    def purge(self) -> PurgeReport:
        """Apply the retention policy now (what the purge thread does every interval)."""
        report = _purge(
            self.captures, self.artifacts, retention=self.retention,
            max_total_bytes=self.max_total_bytes,
        )  # fmt: skip
        self.purges += 1
        self.purged += len(report.result.deleted)
        if report.result.deleted:
            log.info(
                "capture: purged %d capture(s) and %d image blob(s) (retention %s)",
                len(report.result.deleted), len(report.blobs_deleted), self.retention,
            )  # fmt: skip
        return report

    def _purge_every(self) -> None:
        while not self._stopping.is_set():
            try:
                self.purge()
            except Exception as err:  # the store is down: try again at the next interval
                log.warning("capture: purge failed (retrying in %g s): %s",
                            self.purge_interval_s, err)  # fmt: skip
            if self._stopping.wait(self.purge_interval_s):
                return

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every image offered so far is stored or dropped (True) or timeout."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    @property
    def pending(self) -> int:
        return self._pending

    def stats(self) -> dict[str, Any]:
        return {
            "captured": self.captured,
            "bytes": self.captured_bytes,
            "dropped": dict(self.dropped),
            "skipped": dict(self.skipped),
            "pending": self._pending,
            "purges": self.purges,
            "purged": self.purged,
        }

    def relabel(self, labels: tuple[str, str]) -> None:
        """Label the Prometheus counters (model, version) so from now on."""
        if self._counters is not None:
            self._counters.bind(labels)

    # -- the request path ------------------------------------------------------------------
    def offer(
        self,
        ids: Sequence[str],
        images: Sequence[bytes],
        media_types: Sequence[str | None] | None = None,
    ) -> int:
        """Queue the sampled images of one answered request; returns how many were queued.

        Never blocks and never raises: a full queue drops the image and counts it.
        """
        if not self._accepting:
            return 0
        queued = 0
        at: datetime | None = None
        rate = self.sample_rate
        for i, (pid, data) in enumerate(zip(ids, images, strict=False)):
            if rate < 1.0 and self._random.random() >= rate:
                continue
            size = len(data)
            if size > self.max_image_bytes:
                self._skip("too_large")
                continue
            with self._lock:
                if self._queued_bytes + size > self.max_queue_bytes:
                    full = True
                else:
                    full = False
                    self._queued_bytes += size
                    self._pending += 1
            if not full:
                at = at or datetime.now(UTC)
                mime = media_types[i] if media_types is not None else None
                try:
                    self._queue.put_nowait(_Item(pid, bytes(data), mime, at))
                    queued += 1
                    continue
                except queue.Full:
                    self._done(1, size)
            self._drop("queue_full", 1)
        return queued

    # -- the background thread -------------------------------------------------------------
    def _run(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=1.0)
            except queue.Empty:
                if self._stopping.is_set():
                    return
                continue
            batch: list[_Item] = []
            stop = first is _STOP
            if not stop:
                batch.append(first)
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                else:
                    batch.append(item)
            if batch:
                try:
                    self._store(batch)
                except Exception:  # never let the thread die: the batch is lost, counted
                    log.exception("capture: unexpected error; %d image(s) dropped", len(batch))
                    self._drop("store_error", len(batch))
                finally:
                    self._done(len(batch), sum(len(i.data) for i in batch))
            if stop and self._queue.empty():
                return

    def _store(self, batch: list[_Item]) -> None:
        blobs: dict[str, bytes] = {}
        rows: list[dict[str, Any]] = []
        for item in batch:
            digest = sha256_bytes(item.data)
            blobs.setdefault(digest, item.data)
            rows.append(
                {
                    "prediction_id": item.prediction_id,
                    "sha256": digest,
                    "bytes": len(item.data),
                    "media_type": sniff_media_type(item.data, item.media_type),
                    "environment": self.environment,
                    "at": item.at,
                    "expires_at": item.at + self.retention,
                }
            )
        # Rows first, then blobs: a purge that runs in between sees the rows and keeps
        # their blobs, and one that ran before has deleted nothing these rows need.
        if not self._retry(self.captures.record, rows):
            self._drop("store_error", len(rows))
            return
        failed: set[str] = set()
        for digest, data in blobs.items():
            # One blob that fails every try means the store is down: the rest fail too.
            if failed or not self._retry(self._put, data):
                failed.add(digest)
        if failed:
            lost = [r["prediction_id"] for r in rows if r["sha256"] in failed]
            self._retry(self.captures.forget, lost)  # rows whose image could not be kept
            self._drop("store_error", len(lost))
            rows = [r for r in rows if r["sha256"] not in failed]
        if not rows:
            return
        n, size = len(rows), sum(r["bytes"] for r in rows)
        self.captured += n
        self.captured_bytes += size
        if self._counters is not None:
            self._counters.captured(n, size)

    def _put(self, data: bytes) -> None:
        self.artifacts.put_bytes(data, durable=False)

    def _retry(self, fn: Any, *args: Any) -> bool:
        for attempt in range(self.attempts):
            try:
                fn(*args)
                return True
            except Exception as err:  # any backend's error: the store is down or refuses
                if attempt + 1 == self.attempts:
                    log.warning("capture: %s failed %d times: %s", fn.__name__, self.attempts, err)
                    return False
                time.sleep(self.retry_delay_s * (2**attempt))
        return False

    # -- counting --------------------------------------------------------------------------
    def _done(self, n: int, size: int) -> None:
        with self._idle:
            self._pending -= n
            self._queued_bytes -= size
            if not self._pending:
                self._idle.notify_all()

    def _drop(self, reason: str, n: int) -> None:
        self.dropped[reason] += n
        if self._counters is not None:
            self._counters.dropped(reason, n)

    def _skip(self, reason: str) -> None:
        self.skipped[reason] += 1
        if self._counters is not None:
            self._counters.skipped(reason)


class _Counters:
    """The writer's Prometheus counters, children bound once."""

    def __init__(self, registry: CollectorRegistry, labels: tuple[str, str]) -> None:
        from prometheus_client import Counter

        mv = ("model", "version")
        images = Counter("loopline_capture_images", "request images captured", mv,
                         registry=registry)  # fmt: skip
        size = Counter("loopline_capture_bytes", "bytes of request images captured", mv,
                       registry=registry)  # fmt: skip
        dropped = Counter(
            "loopline_capture_dropped_images",
            "sampled request images not captured (queue full, or the store failed)",
            [*mv, "reason"],
            registry=registry,
        )
        skipped = Counter(
            "loopline_capture_skipped_images",
            "request images not captured by rule (larger than capture_max_image_bytes)",
            [*mv, "reason"],
            registry=registry,
        )
        self._parents = (images, size, dropped, skipped)
        self.bind(labels)

    def bind(self, labels: tuple[str, str]) -> None:
        images, size, dropped, skipped = self._parents
        self._images = images.labels(*labels)
        self._bytes = size.labels(*labels)
        self._dropped = {r: dropped.labels(*labels, r) for r in ("queue_full", "store_error")}
        self._skipped = {"too_large": skipped.labels(*labels, "too_large")}

    def captured(self, n: int, size: int) -> None:
        self._images.inc(n)
        self._bytes.inc(size)

    def dropped(self, reason: str, n: int) -> None:
        self._dropped[reason].inc(n)

    def skipped(self, reason: str) -> None:
        self._skipped[reason].inc()


def capture_writer(
    served: ServedModel, settings: ServeSettings, store: Any, metrics: ServerMetrics
) -> CaptureWriter | NoCapture:
    """The server's capture writer from its settings (``NO_CAPTURE`` when capture is off)."""
    if not settings.capture:
        return NO_CAPTURE
    if store is None:
        raise ConfigError("capture needs the metadata store: the server has none open")
    if not settings.artifacts_url:
        raise ConfigError("capture needs an artifact store: set artifacts_url")
    from loopline.drivers.artifacts.store import ArtifactStore

    return CaptureWriter(
        ArtifactStore(settings.artifacts_url),
        store.captures,
        sample_rate=settings.capture_sample_rate,
        max_image_bytes=settings.capture_max_image_bytes,
        retention_days=settings.capture_retention_days,
        max_queue=settings.capture_queue,
        max_queue_bytes=settings.capture_queue_bytes,
        environment=getattr(settings, "environment", None),
        registry=metrics.registry,
        labels=(served.name, str(served.version)),
        purge_interval_s=settings.capture_purge_interval_s,
        max_total_bytes=settings.capture_max_total_bytes,
    )


def capture_overrides(config: Any) -> dict[str, Any]:
    """The ServeSettings fields an environment's ``CaptureConfig`` sets (its read token
    expanded from the variable it names: ConfigError when that is not set)."""
    out = {
        "capture": config.enabled,
        "capture_sample_rate": config.sample_rate,
        "capture_max_image_bytes": config.max_image_bytes,
        "capture_retention_days": config.retention_days,
        "capture_max_total_bytes": config.max_total_bytes,
        "capture_purge_interval_s": config.purge_interval_s,
    }
    read_token = config.read_token_value()
    if read_token:
        out["capture_read_token"] = read_token
    return out


@dataclass(frozen=True)
class PurgeReport:
    """What ``purge_captures`` deleted: capture rows, then the blobs no row needs any more."""

    result: PurgeResult
    blobs_deleted: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {**self.result.to_dict(), "blobs_deleted": list(self.blobs_deleted)}


def purge_captures(
    store: MetadataStore,
    artifacts: ArtifactStore,
    *,
    retention_days: float | None = None,
    max_total_bytes: int | None = None,
    now: datetime | None = None,
    dry_run: bool = False,
) -> PurgeReport:
    """Apply the retention policy: delete expired and over-cap captures (unless a dataset
    version references them), then their blobs; ``dry_run`` says what would go."""
    retention = timedelta(days=retention_days) if retention_days is not None else None
    return _purge(store.captures, artifacts, retention=retention,
                  max_total_bytes=max_total_bytes, now=now, dry_run=dry_run)  # fmt: skip


def _purge(
    captures: CaptureRepository,
    artifacts: ArtifactStore,
    *,
    retention: timedelta | None,
    max_total_bytes: int | None,
    now: datetime | None = None,
    dry_run: bool = False,
) -> PurgeReport:
    result = captures.purge(now, max_total_bytes, retention=retention, dry_run=dry_run)
    deleted = [] if dry_run else captures.delete_blobs(result.orphaned, artifacts.delete)
    return PurgeReport(result, deleted)

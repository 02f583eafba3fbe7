"""The prediction log: every prediction, written in batches off the request path.

Rows go to the metadata store's ``predictions`` table (SQLite or PostgreSQL), where the
Monitor joins them with ``feedback`` by id and queries them by model version and time. A
background thread writes whatever accumulated every ``flush_interval_s`` (sooner when
``flush_max_rows`` are waiting) in one bulk insert per flush.

Durability: a graceful stop (SIGTERM, Ctrl-C) writes every row before the process ends. A
crash (SIGKILL, power loss) loses the rows not yet flushed: at most one flush interval of
predictions. While the store is unreachable rows are kept in memory (up to
``max_pending_rows``, then the oldest are dropped and counted) and retried; if the store
is still down when the server stops, the rows are written to a JSON Lines file instead.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger("loopline.deploy")


class PredictionLog:
    """A batched, thread-safe writer of prediction rows.

    ``write(rows)`` stores a list of row dicts (``MetadataStore.log_predictions``). Rows are
    dicts with the ``predictions`` columns; ``at`` may be a UNIX timestamp (float).
    """

    def __init__(
        self,
        write: Callable[[list[dict[str, Any]]], Any],
        *,
        flush_interval_s: float = 1.0,
        flush_max_rows: int = 5000,
        max_pending_rows: int = 1_000_000,
        spill_dir: Path | None = None,
        on_written: Callable[[int], None] | None = None,
        on_dropped: Callable[[int], None] | None = None,
    ) -> None:
        self._write = write
        self.flush_interval_s = flush_interval_s
        self.flush_max_rows = flush_max_rows
        self.max_pending_rows = max_pending_rows
        self.spill_dir = spill_dir
        self._on_written = on_written
        self._on_dropped = on_dropped
        self._rows: deque[dict[str, Any]] = deque()
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._added = 0
        self._settled = 0  # rows written or dropped
        self._thread: threading.Thread | None = None

    @property
    def pending(self) -> int:
        return len(self._rows)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="loopline-predlog", daemon=True)
            self._thread.start()

    def add(self, rows: list[dict[str, Any]]) -> None:
        """Queue rows for the next flush (cheap: called on the batcher thread)."""
        dropped = 0
        with self._lock:
            self._rows.extend(rows)
            self._added += len(rows)
            while len(self._rows) > self.max_pending_rows:
                self._rows.popleft()
                dropped += 1
            self._settled += dropped
        if dropped:
            log.error("prediction log: store unreachable, dropped %d oldest rows", dropped)
            if self._on_dropped:
                self._on_dropped(dropped)
        if len(self._rows) >= self.flush_max_rows:
            self._wake.set()

    def flush(self, timeout: float = 30.0) -> bool:
        """Write every row added so far; True when they are all stored within ``timeout``."""
        if self._thread is None:
            return self._flush_all()
        with self._lock:
            target = self._added
        self._wake.set()
        deadline = time.monotonic() + timeout
        with self._done:
            while self._settled < target:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._done.wait(left)
        return True

    def close(self, timeout: float = 30.0) -> None:
        """Write everything (spilling to a file if the store stays down), then stop."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)  # its last act is a final flush, with retries
            self._thread = None
        elif self._rows:
            self._flush_all(attempts=3)
        if self._rows:
            self._spill()

    # -- the writer thread ------------------------------------------------------------------
    def _run(self) -> None:
        backoff = self.flush_interval_s
        while not self._stop.is_set():
            self._wake.wait(self.flush_interval_s)
            self._wake.clear()
            if self._flush_all():
                backoff = self.flush_interval_s
            else:  # the store is down: retry later, without spinning
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
        self._flush_all(attempts=3)

    def _flush_all(self, attempts: int = 1) -> bool:
        while self._rows:
            with self._lock:
                n = min(len(self._rows), self.flush_max_rows)
                batch = [self._rows.popleft() for _ in range(n)]
            for attempt in range(attempts):
                try:
                    self._write([_row(r) for r in batch])
                    break
                except Exception as err:
                    log.warning("prediction log: cannot write %d rows: %s", len(batch), err)
                    if attempt + 1 < attempts:
                        time.sleep(0.5 * (attempt + 1))
            else:
                with self._lock:
                    self._rows.extendleft(reversed(batch))
                return False
            with self._done:
                self._settled += len(batch)
                self._done.notify_all()
            if self._on_written:
                self._on_written(len(batch))
        return True

    def _spill(self) -> None:
        import orjson

        rows = list(self._rows)
        self._rows.clear()
        folder = self.spill_dir or Path.cwd()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"predictions-unwritten-{int(time.time())}.jsonl"
        with open(path, "ab") as f:
            for r in rows:
                r = dict(r)
                if isinstance(r.get("at"), float):
                    r["at"] = datetime.fromtimestamp(r["at"], UTC).isoformat()
                f.write(orjson.dumps(r, default=str) + b"\n")
        log.error("prediction log: store unreachable; wrote %d rows to %s", len(rows), path)
        with self._done:
            self._settled += len(rows)
            self._done.notify_all()


def _row(r: dict[str, Any]) -> dict[str, Any]:
    at = r.get("at")
    if isinstance(at, float):
        r = dict(r)
        r["at"] = datetime.fromtimestamp(at, UTC)
    return r

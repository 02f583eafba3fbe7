"""The prediction log: every prediction, written in batches off the request path.

Rows go to the metadata store's ``predictions`` table (SQLite or PostgreSQL), where the
Monitor joins them with ``feedback`` by id and queries them by model version and time. A
background thread writes whatever accumulated every ``flush_interval_s`` (sooner when
``flush_max_rows`` are waiting) in one bulk insert per flush.

Durability: a graceful stop (SIGTERM, Ctrl-C) writes every row before the process ends. A
crash (SIGKILL, power loss) loses the rows not yet flushed: at most one flush interval of
predictions. A batch that cannot be written is retried with backoff, and never blocks the
rows behind it:

* when the store answers other writes (a *probe*: an already stored row written again,
  which the store skips), the batch itself is at fault and goes to a spill file at once;
* after ``write_attempts`` failures in a row the store counts as down: the batch and every
  row waiting go to a spill file, and so does each later batch that fails, until a write
  succeeds. While rows wait in memory they are bounded by ``max_pending_rows`` (beyond,
  the oldest are dropped and counted).

Spill files (``predictions-unwritten-*.jsonl`` in ``spill_dir``) are imported again at
start and every ``reimport_interval_s`` while any exist; the store skips ids it holds, so
an import can be repeated safely, and several server processes may share the folder (a
file is claimed by renaming it). An import stops at the first chunk the store cannot take
and keeps the rest of the file for the next try. Rows the store refuses while it answers
other writes go to ``predictions-rejected-*.jsonl``, kept for a person to look at, and
count as dropped; so do rows that cannot be spilled (``spill_dir`` not writable, disk
full). The writer thread survives any error: it logs it and tries again with backoff.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger("loopline.deploy")

SPILL_GLOB = "predictions-unwritten-*.jsonl"
_CLAIMED = ".importing"


class PredictionLog:
    """A batched, thread-safe writer of prediction rows.

    ``write(rows)`` stores a list of row dicts (``store.predictions.log``), skipping ids
    it already holds. Rows are dicts with the ``predictions`` columns; ``at`` may be a UNIX
    timestamp (float).
    """

    def __init__(
        self,
        write: Callable[[list[dict[str, Any]]], Any],
        *,
        flush_interval_s: float = 1.0,
        flush_max_rows: int = 5000,
        max_pending_rows: int = 1_000_000,
        write_attempts: int = 5,
        spill_dir: Path | None = None,
        reimport_interval_s: float = 30.0,
        max_backoff_s: float = 30.0,
        on_written: Callable[[int], None] | None = None,
        on_dropped: Callable[[int], None] | None = None,
        on_spilled: Callable[[int], None] | None = None,
    ) -> None:
        self._write = write
        self.flush_interval_s = flush_interval_s
        self.flush_max_rows = flush_max_rows
        self.max_pending_rows = max_pending_rows
        self.write_attempts = write_attempts
        self.spill_dir = spill_dir or Path.cwd()
        self.reimport_interval_s = reimport_interval_s
        self.max_backoff_s = max_backoff_s
        self._on_written = on_written
        self._on_dropped = on_dropped
        self._on_spilled = on_spilled
        self._rows: deque[dict[str, Any]] = deque()
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._added = 0
        self._settled = 0  # rows written, spilled or dropped
        self._unwritten = 0  # rows spilled or dropped
        self._failures = 0  # writes failed in a row
        self._probe: dict[str, Any] | None = None  # a row the store holds
        self._spill_failing = False  # the last spill could not be written
        self._thread: threading.Thread | None = None

    @property
    def pending(self) -> int:
        return len(self._rows)

    @property
    def running(self) -> bool:
        """Whether the writer thread is running (from ``start`` until ``close``)."""
        return self._thread is not None and self._thread.is_alive()

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
            self._unwritten += dropped
        if dropped:
            log.error("prediction log: store unreachable, dropped %d oldest rows", dropped)
            _notify(self._on_dropped, dropped)
        if len(self._rows) >= self.flush_max_rows:
            self._wake.set()

    def flush(self, timeout: float = 30.0) -> bool:
        """Write every row added so far; True when they are all stored within ``timeout``.

        False as well when some of them went to a spill file or were dropped instead.
        """
        if self._thread is None:
            unwritten = self._unwritten
            return self._flush_all() and self._unwritten == unwritten
        with self._lock:
            target = self._added
            unwritten = self._unwritten
        self._wake.set()
        deadline = time.monotonic() + timeout
        with self._done:
            while self._settled < target:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._done.wait(left)
            return self._unwritten == unwritten

    def close(self, timeout: float = 30.0) -> None:
        """Write everything (spilling to a file if the store stays down), then stop."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)  # its last act is a final flush, with retries
            self._thread = None
        elif self._rows:
            self._final_flush()
        if self._rows:
            self._spill(self._take(len(self._rows)), "the store is unreachable at stop")

    # -- the writer thread ------------------------------------------------------------------
    def _run(self) -> None:
        # Nothing may end this thread but close(): rows would wait forever, unwritten.
        _guarded(self.import_spilled)
        next_import = time.monotonic() + self.reimport_interval_s
        backoff = self.flush_interval_s
        while not self._stop.is_set():
            self._wake.wait(self.flush_interval_s)
            self._wake.clear()
            try:
                healthy = self._flush_all()
                if healthy and time.monotonic() >= next_import:
                    self.import_spilled()
                    next_import = time.monotonic() + self.reimport_interval_s
            except Exception:
                log.exception("prediction log: the writer failed; trying again")
                healthy = False
            if healthy:
                backoff = self.flush_interval_s
            else:  # the store is down (or the writer failed): retry later, without spinning
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
        _guarded(self._final_flush)

    def _final_flush(self) -> None:
        for attempt in range(3):
            if self._flush_all(spill_when_down=False):
                return
            time.sleep(0.5 * (attempt + 1))

    def _take(self, n: int) -> list[dict[str, Any]]:
        with self._lock:
            return [self._rows.popleft() for _ in range(min(n, len(self._rows)))]

    def _flush_all(self, spill_when_down: bool = True) -> bool:
        """Write the waiting rows, batch by batch; False when the store seems down."""
        while self._rows:
            batch = self._take(self.flush_max_rows)
            if self._try_write(batch):
                _notify(self._on_written, len(batch))
                self._settle(len(batch))
                continue
            if self._store_answers():
                self._spill(batch, "the store refuses this batch")
                continue  # the rows behind it flow
            if spill_when_down and self._failures >= self.write_attempts:
                rest = self._take(len(self._rows))
                self._spill(batch + rest, f"the store failed {self._failures} writes in a row")
                return False
            with self._lock:
                self._rows.extendleft(reversed(batch))
            return False
        return True

    def _try_write(self, rows: list[dict[str, Any]]) -> bool:
        try:
            self._write([_row(r) for r in rows])
        except Exception as err:
            self._failures += 1
            log.warning("prediction log: cannot write %d rows: %s", len(rows), err)
            return False
        self._failures = 0
        if rows:
            self._probe = rows[-1]
        return True

    def _store_answers(self) -> bool:
        """Whether the store takes a write now: an already stored row again (skipped)."""
        if self._probe is None:
            return False
        try:
            self._write([_row(self._probe)])
        except Exception:
            return False
        self._failures = 0
        return True

    def _settle(self, n: int, unwritten: bool = False) -> None:
        with self._done:
            self._settled += n
            if unwritten:
                self._unwritten += n
            self._done.notify_all()

    def _spill(self, rows: list[dict[str, Any]], why: str) -> None:
        """Keep ``rows`` in a spill file; drop (and count) them if none can be written."""
        try:
            path = _write_jsonl(self.spill_dir, "predictions-unwritten", rows)
        except OSError as err:
            if not self._spill_failing:  # once per outage: the dropped-rows counter goes on
                self._spill_failing = True
                log.error(
                    "prediction log: %s, and no spill file can be written in %s (%s); "
                    "dropped %d rows (later drops are counted, not logged)",
                    why, self.spill_dir, err, len(rows),
                )  # fmt: skip
            _notify(self._on_dropped, len(rows))
            self._settle(len(rows), unwritten=True)
            return
        if self._spill_failing:
            self._spill_failing = False
            log.warning("prediction log: spill files can be written in %s again", self.spill_dir)
        log.error("prediction log: %s; wrote %d rows to %s for re-import", why, len(rows), path)
        _notify(self._on_spilled, len(rows))
        self._settle(len(rows), unwritten=True)

    # -- re-importing spill files -------------------------------------------------------------
    def import_spilled(self) -> int:
        """Write the rows of every spill file to the store; return how many were written.

        A file whose rows cannot all be written keeps the rest (in a new spill file) for
        the next try; rows the store refuses while it answers other writes are rejected.
        """
        folder = self.spill_dir
        if not folder.is_dir():
            return 0
        _release_stale_claims(folder)
        written = 0
        for path in sorted(folder.glob(SPILL_GLOB)):
            claim = path.with_name(f"{path.name}.{os.getpid()}{_CLAIMED}")
            try:
                path.rename(claim)
            except OSError:  # another process claimed it
                continue
            try:
                rows, bad_lines = _read_jsonl(claim)
                done, rejected, rest = self._import(rows)
                rejected += bad_lines
                if rejected:
                    where = _write_jsonl(folder, "predictions-rejected", rejected)
                    log.error(
                        "prediction log: the store refuses %d spilled rows; kept in %s",
                        len(rejected),
                        where,
                    )
                    _notify(self._on_dropped, len(rejected))
                if rest:
                    _write_jsonl(folder, "predictions-unwritten", rest)
                claim.unlink()
            except OSError as err:
                log.error("prediction log: cannot import %s: %s", path, err)
                continue
            written += done
            if done:
                log.info("prediction log: imported %d spilled rows from %s", done, path.name)
                _notify(self._on_written, done)
            if rest:
                break  # the store is down: try again later
        return written

    def _import(
        self, rows: list[dict[str, Any]]
    ) -> tuple[int, list[dict[str, Any]], list[dict[str, Any]]]:
        """Write ``rows`` in chunks: (rows written, rows rejected, rows left for later).

        Stops at the first chunk that fails while the store does not answer: a store that
        is down gets one write, not one per chunk, and the rest waits for the next try.
        """
        step = self.flush_max_rows
        written = 0
        rejected: list[dict[str, Any]] = []
        for start in range(0, len(rows), step):
            chunk = rows[start : start + step]
            if self._try_write(chunk):
                written += len(chunk)
                continue
            if not self._store_answers():
                return written, rejected, rows[start:]
            w, r, left = self._bisect(chunk)
            written += w
            rejected += r
            if left:  # the store stopped answering while the chunk was searched
                return written, rejected, left + rows[start + step :]
        return written, rejected, []

    def _bisect(
        self, rows: list[dict[str, Any]]
    ) -> tuple[int, list[dict[str, Any]], list[dict[str, Any]]]:
        """Find the rows the store refuses in a chunk it refused while answering others."""
        if len(rows) == 1:
            return 0, rows, []
        mid = len(rows) // 2
        written = 0
        rejected: list[dict[str, Any]] = []
        rest: list[dict[str, Any]] = []
        for half in (rows[:mid], rows[mid:]):
            if rest:
                rest += half
            elif self._try_write(half):
                written += len(half)
            elif self._store_answers():
                w, r, left = self._bisect(half)
                written, rejected, rest = written + w, rejected + r, rest + left
            else:
                rest += half
        return written, rejected, rest


STATS_WAIT_S = 10.0  # the longest a row waits for its input statistics (see below)


def _row(r: dict[str, Any]) -> dict[str, Any]:
    at = r.get("at")
    stats = r.get("input_stats")
    # The server's batcher fills a row's statistics in just after the answer went out
    # (``runtime.InputStats``); a row is written with them, never before.
    pending = getattr(stats, "wait", None)
    if isinstance(at, float | str) or pending is not None:
        r = dict(r)
        if isinstance(at, float | str):
            r["at"] = datetime.fromtimestamp(at, UTC) if isinstance(at, float) else _parse_time(at)
        if pending is not None:
            pending(STATS_WAIT_S)
            r["input_stats"] = dict(stats)  # type: ignore[arg-type]
    return r


def _parse_time(text: str) -> datetime:
    at = datetime.fromisoformat(text)
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def _write_jsonl(folder: Path, prefix: str, rows: list[dict[str, Any]]) -> Path:
    """Rows as JSON Lines in a new file, which appears complete (written, then renamed)."""
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    path = folder / f"{prefix}-{stamp}-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            for r in rows:
                if isinstance(r.get("at"), float):
                    r = {**r, "at": datetime.fromtimestamp(r["at"], UTC).isoformat()}
                f.write(orjson.dumps(r, default=str) + b"\n")
            f.flush()
            os.fsync(f.fileno())
        tmp.rename(path)
    except OSError:
        with contextlib.suppress(OSError):  # a disk that filled up keeps no half-written file
            tmp.unlink()
        raise
    return path


def _notify(hook: Callable[[int], None] | None, n: int) -> None:
    """Tell a counter about ``n`` rows; a failing hook costs no row."""
    if hook is None:
        return
    try:
        hook(n)
    except Exception:
        log.exception("prediction log: a counter hook failed")


def _guarded(work: Callable[[], Any]) -> None:
    """Run ``work`` on the writer thread; an error is logged, never raised."""
    try:
        work()
    except Exception:
        log.exception("prediction log: the writer failed")


def _read_jsonl(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The rows of a spill file, and the lines that are not rows (kept as rejected)."""
    rows, bad = [], []
    for line in path.read_bytes().splitlines():
        if not line.strip():
            continue
        try:
            row = orjson.loads(line)
        except orjson.JSONDecodeError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad.append({"unreadable_line": line.decode(errors="replace")})
    return rows, bad


def _release_stale_claims(folder: Path) -> None:
    """Put back the spill files claimed by a process that died while importing them."""
    for claim in folder.glob(f"predictions-unwritten-*.jsonl.*{_CLAIMED}"):
        original, _, pid_text = claim.name.removesuffix(_CLAIMED).rpartition(".")
        try:
            pid = int(pid_text)
        except ValueError:
            continue
        if pid != os.getpid() and _alive(pid):
            continue
        try:
            claim.rename(folder / original)
        except OSError:
            continue


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

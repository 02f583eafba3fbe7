"""The agent's prediction spool: a bounded, on-disk queue of rows waiting for the hub.

Rows are appended to an open segment file (JSON lines); ``upload`` seals it and sends the
sealed segments oldest first, deleting each one only once the hub has accepted it. A
segment whose answer was lost is sent again, and the hub skips the ids it already holds,
so every row is stored exactly once. A restart loses nothing that was written: an open
segment left behind is sealed at start (a torn last line, from a power cut mid-write, is
skipped). When more than ``max_rows`` rows wait, the oldest sealed segments are dropped
(counted in ``dropped``) so the device's disk cannot fill.

Standard library only (the agent imports this module).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("loopline.edge")

OPEN = ".open"
SEALED = ".jsonl"


class Spool:
    """Prediction rows on disk until ``upload`` hands them to ``send`` successfully."""

    def __init__(self, folder: Path, *, max_rows: int = 100_000, segment_rows: int = 500) -> None:
        if max_rows < 1 or segment_rows < 1:
            raise ValueError("max_rows and segment_rows must be at least 1")
        self.folder = folder
        self.max_rows = max_rows
        self.segment_rows = segment_rows
        self.dropped = 0
        self.uploaded = 0
        self._lock = threading.Lock()  # appending and sealing
        self._upload_lock = threading.Lock()  # one upload at a time
        folder.mkdir(parents=True, exist_ok=True)
        self._sealed: dict[Path, int] = {}  # segment -> rows, oldest first
        self._open: Path | None = None
        self._open_rows = 0
        self._seq = 0
        for path in sorted(folder.glob(f"*{OPEN}")):  # a previous run's open segment
            self._seal_file(path)
        for path in sorted(folder.glob(f"*{SEALED}")):
            self._sealed[path] = sum(1 for _ in _read_rows(path))
            self._seq = max(self._seq, _seq_of(path))

    @property
    def pending(self) -> int:
        """Rows waiting to be uploaded."""
        with self._lock:
            return self._open_rows + sum(self._sealed.values())

    def add(self, rows: list[dict[str, Any]]) -> None:
        """Append rows (written to disk before this returns)."""
        lines = [json.dumps(r, separators=(",", ":")) + "\n" for r in rows]
        with self._lock:
            while lines:
                if self._open is None:
                    self._seq += 1
                    self._open = self.folder / f"{self._seq:012d}{OPEN}"
                    self._open_rows = 0
                room = self.segment_rows - self._open_rows
                part, lines = lines[:room], lines[room:]
                with open(self._open, "ab") as f:
                    f.write("".join(part).encode())
                    f.flush()
                self._open_rows += len(part)
                if self._open_rows >= self.segment_rows:
                    self._seal_open()
            self._enforce_bound()

    def upload(self, send: Callable[[list[dict[str, Any]]], bool]) -> int:
        """Seal the open segment and ``send`` each sealed one, oldest first, until ``send``
        returns False or raises; returns the rows accepted."""
        sent = 0
        with self._upload_lock:
            with self._lock:
                self._seal_open()
                segments = list(self._sealed)
            for path in segments:
                rows = list(_read_rows(path))
                if rows:
                    try:
                        ok = send(rows)
                    except Exception as err:
                        log.info("prediction upload failed: %s", err)
                        ok = False
                    if not ok:
                        break
                with self._lock:
                    if path in self._sealed:  # not dropped by the bound meanwhile
                        del self._sealed[path]
                        path.unlink(missing_ok=True)
                sent += len(rows)
        self.uploaded += sent
        return sent

    # -- under self._lock ------------------------------------------------------------------
    def _seal_open(self) -> None:
        if self._open is None:
            return
        sealed = self._open.with_suffix(SEALED)
        os.replace(self._open, sealed)
        self._sealed[sealed] = self._open_rows
        self._open, self._open_rows = None, 0

    def _seal_file(self, path: Path) -> None:
        sealed = path.with_suffix(SEALED)
        rows = list(_read_rows(path))  # drops a torn last line
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows))
        os.replace(tmp, sealed)
        path.unlink(missing_ok=True)

    def _enforce_bound(self) -> None:
        total = self._open_rows + sum(self._sealed.values())
        while total > self.max_rows and self._sealed:
            oldest = next(iter(self._sealed))
            n = self._sealed.pop(oldest)
            oldest.unlink(missing_ok=True)
            self.dropped += n
            total -= n
            log.warning("prediction spool is full (%d rows): dropped the oldest %d", total, n)


def _seq_of(path: Path) -> int:
    try:
        return int(path.name.split(".", 1)[0])
    except ValueError:
        return 0


def _read_rows(path: Path) -> Any:
    try:
        text = path.read_text()
    except OSError:
        return
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line torn by a crash mid-write
        if isinstance(row, dict):
            yield row

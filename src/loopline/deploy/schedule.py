"""Regular-interval jobs: ``--every 1h`` parsing and a fixed-rate loop.

``loopline predict --every`` uses these, and the monitor will run its checks on the same
loop. Runs start at fixed slots (start, start + interval, ...); a run that takes longer
than the interval skips the slots it overran instead of starting a burst of catch-up runs.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from loopline.errors import ConfigError, LooplineError

UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
MIN_INTERVAL_S = 1.0
_PART = re.compile(r"(\d+(?:\.\d+)?)([smhd])")


def parse_every(text: str) -> float:
    """Seconds in a duration such as ``30s``, ``5m``, ``1h``, ``1d`` or ``1h30m``.

    Raises ConfigError naming the allowed form for anything else, and for durations under
    one second (each run's output is named by the second it was scheduled for).
    """
    raw = text.strip().lower()
    hint = "use a number and a unit s, m, h or d, e.g. 30s, 5m, 1h or 1h30m"
    pos, seconds = 0, 0.0
    for match in _PART.finditer(raw):
        if match.start() != pos:
            break
        seconds += float(match.group(1)) * UNITS[match.group(2)]
        pos = match.end()
    if not raw or pos != len(raw):
        raise ConfigError(f"invalid --every {text!r}: {hint}")
    if seconds < MIN_INTERVAL_S:
        raise ConfigError(f"--every {text!r} is too short: the shortest interval is 1s")
    return seconds


def timestamped_path(out: Path, when: datetime) -> Path:
    """``out`` with the UTC time ``when`` before its suffix: ``p.parquet`` to
    ``p-20260102T030405Z.parquet``."""
    stamp = when.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    return out.with_name(f"{out.stem}-{stamp}{out.suffix}")


def run_every(
    interval_s: float,
    job: Callable[[int, datetime], None],
    *,
    stop: threading.Event | None = None,
    max_runs: int | None = None,
    on_error: Callable[[int, LooplineError], None] | None = None,
) -> int:
    """Call ``job(run_number, scheduled_at)`` every ``interval_s`` seconds; return the runs.

    The first run starts at once. The loop ends when ``stop`` is set (it is checked while
    waiting, so it ends promptly), after ``max_runs`` runs, or on KeyboardInterrupt (which
    propagates). A run failing with LooplineError is passed to ``on_error`` and the
    schedule goes on; without ``on_error`` the error propagates. Other exceptions are bugs
    and always propagate.
    """
    if not interval_s > 0:
        raise ConfigError(f"interval {interval_s}s must be positive")
    stop = stop or threading.Event()
    start_mono, start_wall = time.monotonic(), time.time()
    runs = 0
    slot = 0
    while not stop.is_set():
        scheduled = datetime.fromtimestamp(start_wall + slot * interval_s, UTC)
        runs += 1
        try:
            job(runs, scheduled)
        except LooplineError as err:
            if on_error is None:
                raise
            on_error(runs, err)
        if max_runs is not None and runs >= max_runs:
            break
        # The next slot still ahead: a run that overran skips the slots it missed.
        elapsed = time.monotonic() - start_mono
        slot = max(slot + 1, int(elapsed // interval_s) + 1)
        stop.wait(max(0.0, start_mono + slot * interval_s - time.monotonic()))
    return runs

"""What the agent measures about itself and its device: latency, CPU, memory, sensors.

Standard library only (the agent imports this module). CPU is the agent process's CPU time
over wall time since the previous sample (100 = one core busy); memory is its resident set
(``/proc/self/statm``, else the peak from ``getrusage``). Sensors are the Linux thermal
zones (``/sys/class/thermal/thermal_zone*/temp``, in degrees Celsius) where present, plus
the numbers of a JSON file the device's own tooling keeps up to date (``--sensors-file``).
"""

from __future__ import annotations

import json
import os
import resource
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

THERMAL_ROOT = Path("/sys/class/thermal")


class LatencyWindow:
    """The latest ``size`` inference latencies, and counts since the last sample."""

    def __init__(self, size: int = 2048) -> None:
        self._values: deque[float] = deque(maxlen=size)
        self._lock = threading.Lock()
        self.total = 0
        self.errors = 0
        self._since_sample = 0

    def observe(self, seconds: float) -> None:
        with self._lock:
            self._values.append(seconds * 1000.0)
            self.total += 1
            self._since_sample += 1

    def error(self) -> None:
        with self._lock:
            self.errors += 1

    def sample(self) -> dict[str, Any]:
        """p50/p95 in ms over the window, and how many inferences since the last sample."""
        with self._lock:
            values = sorted(self._values)
            recent, self._since_sample = self._since_sample, 0
            total, errors = self.total, self.errors
        return {
            "latency_ms_p50": _quantile(values, 0.50),
            "latency_ms_p95": _quantile(values, 0.95),
            "inferences": recent,
            "inferences_total": total,
            "errors_total": errors,
        }


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    index = min(len(values) - 1, max(0, round(q * (len(values) - 1))))
    return round(values[index], 3)


class ProcessStats:
    """CPU share and resident memory of this process."""

    def __init__(self) -> None:
        self._wall = time.monotonic()
        self._cpu = _cpu_seconds()
        self.started = self._wall

    def sample(self) -> dict[str, Any]:
        wall, cpu = time.monotonic(), _cpu_seconds()
        elapsed = max(wall - self._wall, 1e-6)
        percent = 100.0 * (cpu - self._cpu) / elapsed
        self._wall, self._cpu = wall, cpu
        return {
            "cpu_percent": round(percent, 2),
            "rss_mb": round(rss_bytes() / (1 << 20), 2),
            "uptime_s": round(wall - self.started, 1),
        }


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def rss_bytes() -> int:
    """Resident memory of this process in bytes."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak) * 1024  # kB on Linux


def read_sensors(
    sensors_file: Path | None = None, thermal_root: Path = THERMAL_ROOT
) -> dict[str, Any]:
    """The device's sensor readings by name; empty when it has none."""
    out: dict[str, Any] = {}
    for zone in sorted(thermal_root.glob("thermal_zone*")):
        try:
            millideg = int((zone / "temp").read_text().strip())
        except (OSError, ValueError):
            continue
        try:
            kind = (zone / "type").read_text().strip()
        except OSError:
            kind = ""
        key = f"{zone.name}_c"
        out[key] = round(millideg / 1000.0, 2)
        if kind:
            out[f"{zone.name}_type"] = kind
    if sensors_file is not None:
        try:
            data = json.loads(sensors_file.read_text())
        except (OSError, ValueError):
            data = None  # being rewritten or absent this time: the next sample has it
        if isinstance(data, dict):
            for key, value in data.items():
                if isinstance(key, str) and isinstance(value, (int, float, str, bool)):
                    out[key] = value
    return out

"""The memory of a server's processes, read from ``/proc`` (Linux), children included.

A server with several workers is a parent and its worker processes: the sum of their
resident set sizes (``VmRSS``) is what the machine gives it. Pages shared between them
(the interpreter, the model's weights after a fork) count once per process, so the sum
errs on the high side, as a memory budget should.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

PROC = Path("/proc")


def _parent(pid: int) -> int | None:
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    return int(stat.rsplit(")", 1)[1].split()[1])


def process_tree(roots: Iterable[int]) -> list[int]:
    """``roots`` that are alive and every descendant of them."""
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            parent = _parent(int(entry.name))
            if parent is not None:
                children.setdefault(parent, []).append(int(entry.name))
    seen: list[int] = []
    todo = [pid for pid in roots if (PROC / str(pid)).exists()]
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.append(pid)
        todo.extend(children.get(pid, []))
    return sorted(seen)


def rss_mb(pid: int) -> float | None:
    """Resident memory of ``pid`` in MiB (None when it is gone)."""
    try:
        for line in (PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        return None
    return 0.0  # a zombie has no VmRSS line


def tree_rss_mb(roots: Iterable[int]) -> tuple[float, list[int]]:
    """Total resident memory of ``roots`` and their descendants, and their pids."""
    pids = process_tree(roots)
    total = sum(v for v in (rss_mb(p) for p in pids) if v is not None)
    return total, pids


class MemorySampler:
    """Samples the memory of the processes ``pids()`` names, every ``interval_s``, in a
    thread; ``peak_mb`` is the highest total seen."""

    def __init__(self, pids: Callable[[], list[int]], interval_s: float = 0.25) -> None:
        self._pids = pids
        self.interval_s = interval_s
        self.peak_mb: float | None = None
        self.last_mb: float | None = None
        self.processes: list[int] = []
        self.samples = 0
        self.unavailable: str | None = None if PROC.is_dir() else "no /proc on this system"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> None:
        if self.unavailable:
            return
        total, pids = tree_rss_mb(self._pids())
        if not pids:
            return
        self.samples += 1
        self.last_mb = total
        self.processes = pids
        self.peak_mb = total if self.peak_mb is None else max(self.peak_mb, total)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def start(self) -> None:
        self.sample()
        self._thread = threading.Thread(target=self._loop, name="replica-memory", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
        self.sample()

    def describe(self) -> dict[str, Any]:
        return {
            "peak_mb": None if self.peak_mb is None else round(self.peak_mb, 1),
            "last_mb": None if self.last_mb is None else round(self.last_mb, 1),
            "processes": self.processes,
            "samples": self.samples,
        }


def group_members(pgid: int) -> list[int]:
    """The processes of process group ``pgid`` still alive (zombies aside)."""
    out = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(entry.name))
    return sorted(out)


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists (and is not a zombie)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state != "Z"

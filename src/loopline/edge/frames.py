"""Inference on a folder of frames: each new image file once, results appended to a log.

A frame is new when its name was not processed before (``frames-done.txt`` in the work
folder remembers names across restarts; names no longer in the folder are forgotten). A
file still being written (changed within ``settle_s``) waits for the next scan, and names
starting with ``.`` are skipped, so a camera writing ``.tmp`` files and renaming them is
read whole. Each result (or error) is one JSON line in ``frames.jsonl``; the prediction
also goes to the prediction log like any other.
"""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loopline.errors import LooplineError

SUFFIXES = (".jpg", ".jpeg", ".png")
DONE_FILE = "frames-done.txt"
RESULTS_FILE = "frames.jsonl"


class FrameFolder:
    def __init__(self, folder: Path, work_dir: Path, *, settle_s: float = 0.2) -> None:
        self.folder = folder
        self.done_file = work_dir / DONE_FILE
        self.results = work_dir / RESULTS_FILE
        self.settle_s = settle_s
        try:
            self.done = set(self.done_file.read_text().splitlines())
        except OSError:
            self.done = set()

    def scan(self, agent: Any) -> int:
        """Infer on every new frame; returns how many were processed."""
        now = time.time()
        present = {}
        for entry in os.scandir(self.folder):
            name = entry.name
            if name.startswith(".") or not name.lower().endswith(SUFFIXES) or not entry.is_file():
                continue
            present[name] = entry
        if self.done - set(present):  # forget frames that are gone
            self.done &= set(present)
            _write_lines(self.done_file, sorted(self.done))
        count = 0
        for name in sorted(present):
            if name in self.done:
                continue
            if now - present[name].stat().st_mtime < self.settle_s:
                continue
            self._process(agent, name)
            count += 1
        return count

    def _process(self, agent: Any, name: str) -> None:
        line: dict[str, Any] = {"file": name, "at": datetime.now(UTC).isoformat()}
        try:
            data = (self.folder / name).read_bytes()
            line.update(agent.infer(data, "edge-frames", {"frame": name}))
        except (LooplineError, OSError) as err:
            line["error"] = str(err)
        with open(self.results, "a") as f:
            f.write(json.dumps(line) + "\n")
        self.done.add(name)
        with open(self.done_file, "a") as f:
            f.write(name + "\n")


def _write_lines(path: Path, lines: list[str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    os.replace(tmp, path)

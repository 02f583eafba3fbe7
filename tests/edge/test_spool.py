"""The agent's prediction spool: bounded, durable across restarts, each row sent once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from loopline.edge.spool import Spool


def rows(start: int, n: int) -> list[dict[str, Any]]:
    return [{"id": f"r{i}", "n": i} for i in range(start, start + n)]


class Hub:
    """Takes what it is sent, or fails (``up`` False); remembers every id it was sent."""

    def __init__(self) -> None:
        self.up = True
        self.stored: dict[str, int] = {}
        self.calls = 0

    def send(self, batch: list[dict[str, Any]]) -> bool:
        self.calls += 1
        if not self.up:
            raise ConnectionError("hub down")
        for r in batch:
            self.stored[r["id"]] = self.stored.get(r["id"], 0) + 1
        return True


def test_rows_wait_while_the_hub_is_down_and_go_once_when_it_is_back(tmp_path: Path) -> None:
    spool, hub = Spool(tmp_path, segment_rows=4), Hub()
    spool.add(rows(0, 3))
    hub.up = False
    assert spool.upload(hub.send) == 0 and spool.pending == 3
    spool.add(rows(3, 7))
    assert spool.upload(hub.send) == 0 and spool.pending == 10
    hub.up = True
    assert spool.upload(hub.send) == 10
    assert spool.pending == 0 and spool.upload(hub.send) == 0
    assert hub.stored == {f"r{i}": 1 for i in range(10)}
    assert list(tmp_path.iterdir()) == []


def test_a_restart_keeps_every_written_row_and_skips_a_torn_line(tmp_path: Path) -> None:
    spool = Spool(tmp_path, segment_rows=100)
    spool.add(rows(0, 5))  # in the open segment
    (open_segment,) = tmp_path.glob("*.open")
    with open(open_segment, "a") as f:
        f.write('{"id": "torn')  # a power cut mid-write
    again = Spool(tmp_path, segment_rows=100)
    assert again.pending == 5
    again.add(rows(5, 2))
    hub = Hub()
    assert again.upload(hub.send) == 7
    assert sorted(hub.stored) == sorted(f"r{i}" for i in range(7))


def test_a_failed_segment_is_sent_again_and_later_ones_wait(tmp_path: Path) -> None:
    spool, sent = Spool(tmp_path, segment_rows=2), []
    spool.add(rows(0, 6))  # three segments

    def flaky(batch: list[dict[str, Any]]) -> bool:
        sent.append([r["id"] for r in batch])
        return len(sent) != 2  # the second segment fails once

    assert spool.upload(flaky) == 2 and spool.pending == 4
    assert spool.upload(flaky) == 4 and spool.pending == 0
    assert sent == [["r0", "r1"], ["r2", "r3"], ["r2", "r3"], ["r4", "r5"]]


def test_the_spool_is_bounded_by_dropping_the_oldest(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_rows=10, segment_rows=4)
    spool.add(rows(0, 12))
    assert spool.pending <= 10 and spool.dropped == 12 - spool.pending
    hub = Hub()
    spool.upload(hub.send)
    assert sorted(hub.stored, key=lambda k: int(k[1:]))[-1] == "r11"  # the newest are kept
    assert "r0" not in hub.stored
    with pytest.raises(ValueError):
        Spool(tmp_path, max_rows=0)

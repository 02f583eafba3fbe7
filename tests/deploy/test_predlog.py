"""PredictionLog: batched writes, flush on demand, durability when the store is down."""

from __future__ import annotations

import threading
from pathlib import Path

import orjson

from loopline.deploy.predlog import PredictionLog


class FlakyStore:
    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.calls = 0
        self.down = False
        self.lock = threading.Lock()

    def write(self, rows: list[dict]) -> int:
        with self.lock:
            self.calls += 1
            if self.down:
                raise ConnectionError("database is down")
            self.rows.extend(rows)
        return len(rows)


def row(i: int) -> dict:
    return {"id": f"{i:032d}", "at": 1_790_000_000.0 + i, "label": "car"}


def test_batches_and_flush() -> None:
    store = FlakyStore()
    log = PredictionLog(store.write, flush_interval_s=60, flush_max_rows=100)
    log.start()
    for i in range(0, 250, 10):
        log.add([row(j) for j in range(i, i + 10)])
    assert log.flush(10)
    assert [r["id"] for r in store.rows] == [row(i)["id"] for i in range(250)]
    assert store.calls <= 5  # batches, not one write per row
    assert store.rows[0]["at"].tzinfo is not None  # UNIX time became an aware datetime
    log.close()


def test_store_down_keeps_rows_and_spills_on_close(tmp_path: Path) -> None:
    store = FlakyStore()
    store.down = True
    log = PredictionLog(store.write, flush_interval_s=0.05, spill_dir=tmp_path)
    log.start()
    log.add([row(i) for i in range(20)])
    assert not log.flush(0.5)
    assert log.pending == 20
    store.down = False
    assert log.flush(10)  # retried once the store is back
    assert len(store.rows) == 20
    store.down = True
    log.add([row(i) for i in range(20, 25)])
    log.close()
    (spilled,) = tmp_path.glob("predictions-unwritten-*.jsonl")
    lines = [orjson.loads(x) for x in spilled.read_bytes().splitlines()]
    assert [x["id"] for x in lines] == [row(i)["id"] for i in range(20, 25)]


def test_memory_is_bounded_while_the_store_is_down() -> None:
    store = FlakyStore()
    store.down = True
    dropped: list[int] = []
    log = PredictionLog(store.write, max_pending_rows=1000, on_dropped=dropped.append)
    log.add([row(i) for i in range(1500)])
    assert log.pending == 1000 and sum(dropped) == 500

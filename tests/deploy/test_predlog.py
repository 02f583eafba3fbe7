"""PredictionLog on a real store: batched writes, a poison batch that blocks nothing, spill
files that are imported again once the store is back, and bounded memory.

The store "goes down" for real: its ``predictions`` table is renamed away (every write and
every probe then fails, as when the database is unreachable) and renamed back to recover.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from loopline.deploy.predlog import PredictionLog
from loopline.drivers.metadata.store import MetadataStore


def rows(start: int, n: int, bad: set[int] | None = None) -> list[dict[str, Any]]:
    """Rows as the server makes them; the store cannot take those in ``bad`` (their label
    is no string: SQLite's ``INSERT OR IGNORE`` would silently skip a NULL one)."""
    return [
        {
            "id": f"{i:032d}",
            "at": 1_790_000_000.0 + i,
            "model_name": "vehicles",
            "model_version": 1,
            "source": "v1",
            "label": {"not": "a string"} if i in (bad or set()) else "car",
            "confidence": 0.9,
            "probabilities": [0.9, 0.1],
            "request_metadata": {"camera_id": "c1"},
            "input_stats": {"brightness": 100.0},
        }
        for i in range(start, start + n)
    ]


def ids(*ranges: range) -> set[str]:
    return {f"{i:032d}" for r in ranges for i in r}


@pytest.fixture
def store(db_url: str) -> Iterator[MetadataStore]:
    s = MetadataStore(db_url)
    yield s
    s.close()


@pytest.fixture
def spill(tmp_path: Path) -> Path:
    return tmp_path / "spill"


def stored(store: MetadataStore) -> set[str]:
    return {p.id for p in store.predictions.find()}


def table_away(store: MetadataStore, away: bool) -> None:
    old, new = ("predictions", "predictions_away") if away else ("predictions_away", "predictions")
    with store.engine.begin() as conn:
        conn.exec_driver_sql(f"ALTER TABLE {old} RENAME TO {new}")


def spilled(folder: Path, kind: str = "unwritten") -> list[dict[str, Any]]:
    return [
        orjson.loads(line)
        for path in sorted(folder.glob(f"predictions-{kind}-*.jsonl"))
        for line in path.read_bytes().splitlines()
    ]


def wait_for(what: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def test_batches_and_flush(store: MetadataStore) -> None:
    writes: list[int] = []

    def write(batch: list[dict[str, Any]]) -> int:
        writes.append(len(batch))
        return store.predictions.log(batch)

    log = PredictionLog(write, flush_interval_s=60, flush_max_rows=100)
    log.start()
    for i in range(0, 250, 10):
        log.add(rows(i, 10))
    assert log.flush(10)
    assert stored(store) == ids(range(250))
    assert sum(writes) == 250 and len(writes) <= 5  # batches, not one write per row
    (first,) = store.predictions.find(limit=1)
    assert first.at.timestamp() == 1_790_000_000.0  # UNIX time became a datetime
    log.close()


def test_a_poison_batch_does_not_block_later_rows(store: MetadataStore, spill: Path) -> None:
    log = PredictionLog(store.predictions.log, flush_max_rows=10, spill_dir=spill)
    log.add(rows(0, 10))
    assert log.flush()
    log.add(rows(10, 10, bad={15}))
    assert not log.flush()  # the store answers other writes: the batch is at fault
    log.add(rows(20, 10))
    assert log.flush()
    assert stored(store) == ids(range(10), range(20, 30))
    assert {r["id"] for r in spilled(spill)} == ids(range(10, 20))

    assert log.import_spilled() == 9
    assert stored(store) == ids(range(30)) - ids(range(15, 16))
    assert [r["id"] for r in spilled(spill, "rejected")] == [f"{15:032d}"]
    assert spilled(spill) == []


def test_a_first_batch_that_keeps_failing_goes_after_n_attempts(
    store: MetadataStore, spill: Path
) -> None:
    # Nothing written yet, so nothing to probe the store with: the count decides.
    log = PredictionLog(store.predictions.log, flush_max_rows=10, write_attempts=3, spill_dir=spill)
    log.add(rows(0, 10, bad={3}))
    log.add(rows(10, 10))
    assert not log.flush() and not log.flush()
    assert log.pending == 20 and spilled(spill) == []
    assert not log.flush()  # the third failure in a row: everything waiting is spilled
    assert log.pending == 0 and len(spilled(spill)) == 20
    log.add(rows(20, 10))
    assert log.flush()  # later rows flow
    assert log.import_spilled() == 19
    assert stored(store) == ids(range(30)) - ids(range(3, 4))
    assert spilled(spill) == []


def test_spilled_rows_are_imported_after_the_store_recovers(
    store: MetadataStore, spill: Path
) -> None:
    log = PredictionLog(
        store.predictions.log,
        flush_interval_s=0.05,
        write_attempts=2,
        reimport_interval_s=0.05,
        max_backoff_s=0.2,
        spill_dir=spill,
    )
    log.start()
    try:
        log.add(rows(0, 10))
        assert log.flush(30)
        table_away(store, True)
        log.add(rows(10, 10))
        wait_for(lambda: len(spilled(spill)) == 10)
        assert log.pending == 0
        table_away(store, False)
        log.add(rows(20, 10))
        assert log.flush(30)
        wait_for(lambda: stored(store) == ids(range(30)))  # re-imported while running
    finally:
        log.close()
    assert spilled(spill) == []


def test_import_at_start_is_idempotent(store: MetadataStore, spill: Path) -> None:
    down = PredictionLog(store.predictions.log, spill_dir=spill)
    table_away(store, True)
    down.add(rows(0, 25))
    down.close()  # the store is down at stop: the rows go to a spill file
    table_away(store, False)
    (path,) = spill.glob("predictions-unwritten-*.jsonl")
    copy = spill / "copy.bak"
    shutil.copy(path, copy)

    log = PredictionLog(store.predictions.log, flush_interval_s=0.05, spill_dir=spill)
    log.start()  # imports what it finds
    wait_for(lambda: stored(store) == ids(range(25)))
    shutil.copy(copy, path)  # the same rows again: known ids are skipped
    assert log.import_spilled() == 25
    log.close()
    assert store.predictions.count() == 25
    assert spilled(spill) == []


def test_a_claim_left_by_a_dead_process_is_imported(store: MetadataStore, spill: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    spill.mkdir()
    claim = spill / f"predictions-unwritten-x.jsonl.{int(dead.stdout)}.importing"
    claim.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows(0, 5)))
    log = PredictionLog(store.predictions.log, spill_dir=spill)
    assert log.import_spilled() == 5
    assert list(spill.iterdir()) == []


def test_memory_is_bounded_while_the_store_is_down(store: MetadataStore) -> None:
    dropped: list[int] = []
    log = PredictionLog(store.predictions.log, max_pending_rows=1000, on_dropped=dropped.append)
    log.add(rows(0, 1500))
    assert log.pending == 1000 and sum(dropped) == 500


def test_rows_that_cannot_be_spilled_are_dropped_and_the_writer_lives_on(
    store: MetadataStore, tmp_path: Path
) -> None:
    not_a_folder = tmp_path / "spill"
    not_a_folder.write_text("a file where the spill folder should be")
    dropped: list[int] = []
    log = PredictionLog(
        store.predictions.log,
        flush_interval_s=0.05,
        write_attempts=1,
        max_backoff_s=0.2,
        spill_dir=not_a_folder,
        on_dropped=dropped.append,
    )
    log.start()
    try:
        table_away(store, True)
        log.add(rows(0, 10))
        assert not log.flush(30)  # settled, but not written
        assert sum(dropped) == 10 and log.pending == 0
        assert log.running
        table_away(store, False)  # the store recovers: new rows are written again
        log.add(rows(10, 10))
        assert log.flush(30)
        assert stored(store) == ids(range(10, 20))
    finally:
        log.close()
    assert not_a_folder.read_text().startswith("a file")


def test_the_writer_survives_a_failing_hook(store: MetadataStore, spill: Path) -> None:
    calls: list[int] = []

    def on_written(n: int) -> None:
        calls.append(n)
        if len(calls) == 1:
            raise RuntimeError("a metrics hook with a bug")

    log = PredictionLog(
        store.predictions.log,
        flush_interval_s=0.05,
        max_backoff_s=0.2,
        spill_dir=spill,
        on_written=on_written,
    )
    log.start()
    try:
        log.add(rows(0, 5))
        assert log.flush(30)
        log.add(rows(5, 5))
        assert log.flush(30)
        assert log.running
    finally:
        log.close()
    assert stored(store) == ids(range(10)) and calls == [5, 5]
    assert not spill.exists()


def test_an_import_stops_at_the_first_chunk_the_store_cannot_take(
    store: MetadataStore, spill: Path
) -> None:
    calls: list[int] = []

    def write(batch: list[dict[str, Any]]) -> int:
        calls.append(len(batch))
        n = store.predictions.log(batch)
        if len(calls) == 1:
            table_away(store, True)  # the store goes down after the file's first chunk
        return n

    spill.mkdir()
    path = spill / "predictions-unwritten-x.jsonl"
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows(0, 50)))
    log = PredictionLog(write, flush_max_rows=10, spill_dir=spill)
    assert log.import_spilled() == 10
    # The first chunk, the second (failed), one probe: the other three were not tried.
    assert calls == [10, 10, 1]
    assert {r["id"] for r in spilled(spill)} == ids(range(10, 50))  # kept for later
    calls.clear()
    assert log.import_spilled() == 0
    assert calls == [10, 1]  # a store that is down gets one write (and a probe) per try
    table_away(store, False)
    assert log.import_spilled() == 40
    assert stored(store) == ids(range(50)) and spilled(spill) == []

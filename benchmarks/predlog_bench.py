"""Prediction-log inserts on SQLite: the driver-level fast path against SQLAlchemy Core.

Both write the same 1,000-row batches (the server's typical flush) into fresh SQLite
files: Loopline's path (``store.predictions.log``, one ``executemany`` with orjson) and
SQLAlchemy Core (``insert(Prediction).on_conflict_do_nothing()`` with the same rows, type
processing by SQLAlchemy). Prints rows/s for each and the ratio (fast / Core); also the
CPU seconds per 1,000 rows, which is what holds the server's GIL.

    python benchmarks/predlog_bench.py --batches 30
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from loopline.drivers.metadata.models import Prediction
from loopline.drivers.metadata.store import MetadataStore


def batch(n: int, start: datetime, prefix: str) -> list[dict[str, Any]]:
    return [
        {
            "id": f"{prefix}{i:024d}",
            "at": start + timedelta(milliseconds=i),
            "model_name": "vehicles",
            "model_version": 1,
            "source": "v1",
            "label": "car",
            "confidence": 0.9,
            "probabilities": [0.9, 0.02, 0.03, 0.03, 0.02],
            "request_metadata": {"camera_id": f"cam-{i % 8}", "site": "north"},
            "input_stats": {"brightness": 101.5, "contrast": 22.25, "width": 640},
        }
        for i in range(n)
    ]


def core_writer(store: MetadataStore) -> Callable[[list[dict[str, Any]]], Any]:
    from sqlalchemy.dialects.sqlite import insert

    stmt = insert(Prediction).on_conflict_do_nothing(index_elements=["id"])

    def write(rows: list[dict[str, Any]]) -> None:
        with store.engine.begin() as conn:
            conn.execute(stmt, rows)

    return write


def measure(kind: str, work: Path, batches: int, size: int) -> tuple[float, float]:
    store = MetadataStore(f"sqlite:///{work / f'{kind}.db'}")
    write = store.predictions.log if kind == "fast" else core_writer(store)
    t0 = datetime(2026, 12, 1, tzinfo=UTC)
    data = [batch(size, t0, f"{kind[0]}{b:07d}") for b in range(batches)]
    write(batch(size, t0, "warm"))
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for rows in data:
        write(rows)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    assert store.predictions.count() == size * (batches + 1)
    store.close()
    return batches * size / wall, cpu / batches * 1000 / size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--size", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, list[tuple[float, float]]] = {"fast": [], "core": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):  # interleaved, so both see the same machine load
            for kind in ("fast", "core"):
                work = Path(tmp) / f"{kind}{r}"
                work.mkdir()
                results[kind].append(measure(kind, work, args.batches, args.size))
    best = {kind: max(runs) for kind, runs in results.items()}
    for kind, (rate, cpu) in best.items():
        print(f"{kind:>4}: {rate:10,.0f} rows/s   {cpu * 1000:6.1f} ms CPU per 1,000 rows")
    print(f"ratio fast/core: {best['fast'][0] / best['core'][0]:.2f}x")


if __name__ == "__main__":
    main()

"""The prediction log's bulk insert stores exactly what the ORM would, on every backend.

On SQLite ``store.predictions.log`` bypasses SQLAlchemy's per-row processing (see
``PredictionRepository._log_sqlite``); these tests write the same rows through it and
through the ORM and compare what the ORM reads back, so the two cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import text

from loopline.drivers.metadata.models import Prediction
from loopline.drivers.metadata.predictions import COLUMNS
from loopline.drivers.metadata.store import MetadataStore

T0 = datetime(2026, 11, 27, 8, 0, 0, 123456, tzinfo=UTC)


def rows(prefix: str) -> list[dict[str, Any]]:
    return [
        {
            "id": f"{prefix}{i:030d}",
            "at": T0 + timedelta(seconds=i, microseconds=i),
            "model_name": "vehicles",
            "model_version": 1 + i % 2,
            "source": "v1" if i % 2 else "v2",
            "label": "car" if i % 3 else "bus",
            "confidence": 0.5 + i / 1000,
            "probabilities": [0.1, 0.2, 0.3, 0.2, 0.2] if i % 4 else None,
            "request_metadata": {"camera_id": f"c{i % 3}", "tags": ["a", "é"]} if i % 2 else None,
            "input_stats": {"brightness": 100.5 + i, "nested": {"n": i, "ok": True}},
        }
        for i in range(12)
    ]


@pytest.fixture
def store(db_url: str) -> Iterator[MetadataStore]:
    s = MetadataStore(db_url)
    yield s
    s.close()


def _read(store: MetadataStore, prefix: str) -> list[dict[str, Any]]:
    out = []
    for p in store.predictions.find():
        if p.id.startswith(prefix):
            row = {c: getattr(p, c) for c in COLUMNS}
            row["id"] = row["id"][len(prefix) :]
            out.append(row)
    return out


def test_bulk_log_reads_back_as_orm_written_rows(store: MetadataStore) -> None:
    assert set(COLUMNS) == set(Prediction.__table__.columns.keys())
    assert store.predictions.log(rows("f")) == 12
    with store.session() as s:
        s.add_all(Prediction(**r) for r in rows("o"))
    fast, orm = _read(store, "f"), _read(store, "o")
    assert len(fast) == 12 and fast == orm
    for got, sent in zip(fast, rows(""), strict=True):
        at = got["at"] if got["at"].tzinfo else got["at"].replace(tzinfo=UTC)
        assert at == sent["at"]  # the instant, to the microsecond
        assert got["request_metadata"] == sent["request_metadata"]
        assert got["input_stats"] == sent["input_stats"]


def test_time_windows_find_bulk_and_orm_rows_alike(store: MetadataStore) -> None:
    store.predictions.log(rows("f"))
    with store.session() as s:
        s.add_all(Prediction(**r) for r in rows("o"))
    since, until = T0 + timedelta(seconds=3), T0 + timedelta(seconds=7, microseconds=7)
    found = [p.id for p in store.predictions.find(since=since, until=until)]
    assert sorted(i[1:] for i in found if i[0] == "f") == sorted(
        i[1:] for i in found if i[0] == "o"
    )
    assert len(found) == 2 * 4  # seconds 3, 4, 5, 6; the row at 7 s + 7 us is excluded
    assert store.predictions.count("vehicles", 2, since=since) == 2 * 5  # odd i from 3


def test_an_offset_time_is_stored_as_its_utc_instant(store: MetadataStore) -> None:
    row = rows("z")[0]
    row["at"] = T0.astimezone(timezone(timedelta(hours=2)))
    store.predictions.log([row])
    (got,) = store.predictions.find()
    at = got.at if got.at.tzinfo else got.at.replace(tzinfo=UTC)
    assert at == T0
    assert store.predictions.count(since=T0, until=T0 + timedelta(microseconds=1)) == 1


def test_sqlite_bulk_text_equals_the_orm_text(tmp_path: Any) -> None:
    """The stored SQLite text itself: the same bytes as the ORM writes for the time."""
    store = MetadataStore(f"sqlite:///{tmp_path / 'p.db'}")
    try:
        store.predictions.log(rows("f")[:1])
        with store.session() as s:
            s.add(Prediction(**rows("o")[0]))
        with store.engine.connect() as conn:
            stored = dict(conn.execute(text("SELECT substr(id, 1, 1), at FROM predictions")).all())
        assert stored["f"] == stored["o"] == "2026-11-27 08:00:00.123456"
    finally:
        store.close()

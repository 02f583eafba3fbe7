"""``store.captures`` on every backend: recording, retention, the size cap, dataset references,
and purges that race each other and the server's writes."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from loopline.drivers.metadata.store import MetadataStore

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)


@pytest.fixture
def store(db_url: str) -> Iterator[MetadataStore]:
    s = MetadataStore(db_url)
    yield s
    s.close()


def row(pid: str, digest: str, *, size: int = 100, age_days: float = 0, keep_days: float = 30,
        env: str | None = "production") -> dict[str, Any]:  # fmt: skip
    at = NOW - timedelta(days=age_days)
    return {
        "prediction_id": pid,
        "sha256": digest * 64 if len(digest) == 1 else digest,
        "bytes": size,
        "media_type": "image/png",
        "environment": env,
        "at": at,
        "expires_at": at + timedelta(days=keep_days),
    }


def test_rows_are_recorded_in_one_write_and_idempotently(store: MetadataStore) -> None:
    assert store.captures.record([row("p1", "a"), row("p2", "b", age_days=1)]) == 2
    # A retried write (same ids, even with other values) changes nothing.
    store.captures.record([row("p1", "c"), row("p2", "c"), row("p3", "c", age_days=2)])
    assert store.captures.count() == 3
    got = store.captures.get("p1")
    assert got is not None and got.sha256 == "a" * 64 and got.bytes == 100
    assert got.at == NOW and got.at.tzinfo is not None and got.environment == "production"
    assert got.expires_at == NOW + 30 * DAY
    assert store.captures.get("nope") is None
    assert [r.prediction_id for r in store.captures.recent()] == ["p1", "p2", "p3"]
    assert [r.prediction_id for r in store.captures.recent(2)] == ["p1", "p2"]
    assert store.captures.count(environment="staging") == 0


def test_expired_rows_are_those_past_retention_and_unreferenced(store: MetadataStore) -> None:
    store.captures.record([
        row("old", "a", age_days=31), row("young", "b", age_days=5),
        row("kept", "c", age_days=40), row("mid", "d", age_days=10),
    ])  # fmt: skip
    assert store.captures.mark_used(["kept"], "ds-1") == 1
    assert [r.prediction_id for r in store.captures.expired(NOW)] == ["old"]
    # A retention shortened since capture applies at once.
    shorter = store.captures.expired(NOW, retention=7 * DAY)
    assert [r.prediction_id for r in shorter] == ["old", "mid"]


def test_purge_deletes_expired_rows_but_not_referenced_ones(store: MetadataStore) -> None:
    store.captures.record([
        row("old", "a", age_days=31), row("young", "b"),
        row("used", "c", age_days=90), row("shares", "b", age_days=60),
    ])  # fmt: skip
    store.captures.mark_used(["used"], "ds-7")
    preview = store.captures.purge(NOW, dry_run=True)
    assert {r.prediction_id for r in preview.deleted} == {"old", "shares"}
    assert store.captures.count() == 4  # a dry run deletes nothing

    result = store.captures.purge(NOW)
    assert {r.prediction_id for r in result.expired} == {"old", "shares"}
    assert result.over_cap == []
    # "shares" used blob b, which "young" still references: only a is orphaned.
    assert result.orphaned == ["a" * 64]
    assert {r.prediction_id for r in store.captures.recent()} == {"young", "used"}
    assert result.remaining_rows == 2 and result.remaining_bytes == 200
    assert store.captures.purge(NOW).deleted == []  # nothing left to do


def test_the_size_cap_deletes_the_oldest_unreferenced_first(store: MetadataStore) -> None:
    store.captures.record([
        row("r4", "a", size=400, age_days=4), row("r3", "b", size=300, age_days=3),
        row("r2", "c", size=200, age_days=2), row("r1", "d", size=100, age_days=1),
        row("dup", "d", size=100, age_days=0.5),  # same bytes as r1: one blob
        row("used", "e", size=1000, age_days=5),
    ])  # fmt: skip
    store.captures.mark_used(["used"], "ds-1")
    assert store.captures.total_bytes() == 2000  # distinct blobs: d counts once
    result = store.captures.purge(NOW, max_total_bytes=1350)
    # The referenced 1000 bytes stay; r4 then r3 go (oldest first) until 1300 <= 1350.
    assert [r.prediction_id for r in result.over_cap] == ["r4", "r3"]
    assert result.orphaned == ["a" * 64, "b" * 64]
    assert result.remaining_bytes == 1300 == store.captures.total_bytes()
    # A cap the referenced rows alone exceed: every unreferenced row goes, "used" stays.
    result = store.captures.purge(NOW, max_total_bytes=10)
    assert {r.prediction_id for r in result.over_cap} == {"r2", "r1", "dup"}
    assert result.orphaned == ["c" * 64, "d" * 64]
    assert [r.prediction_id for r in store.captures.recent()] == ["used"]


def test_mark_used_keeps_the_first_version_and_unmark_releases(store: MetadataStore) -> None:
    store.captures.record([row("p1", "a", age_days=60), row("p2", "b", age_days=60)])
    assert store.captures.mark_used(["p1", "p2", "unknown"], "ds-1") == 2
    assert store.captures.mark_used(["p1"], "ds-2") == 0
    got = store.captures.get("p1")
    assert got is not None and got.dataset_version == "ds-1"
    assert store.captures.count(dataset_version="ds-1") == 2
    assert store.captures.purge(NOW).deleted == []
    assert store.captures.unmark("ds-1") == 2
    assert {r.prediction_id for r in store.captures.purge(NOW).deleted} == {"p1", "p2"}


def test_a_blob_referenced_again_after_the_purge_is_not_deleted(store: MetadataStore) -> None:
    store.captures.record([row("old", "a", age_days=40), row("other", "b", age_days=40)])
    result = store.captures.purge(NOW)
    assert result.orphaned == ["a" * 64, "b" * 64]
    # A server captures the same bytes again before the blobs are deleted.
    store.captures.record([row("new", "a")])
    deleted: list[str] = []
    assert store.captures.delete_blobs(result.orphaned, deleted.append) == ["b" * 64]
    assert deleted == ["b" * 64]


def test_concurrent_purges_delete_each_row_once(db_url: str, store: MetadataStore) -> None:
    rows = [row(f"p{i:03d}", f"{i:064x}", size=10, age_days=40 if i % 2 else 1)
            for i in range(200)]  # fmt: skip
    store.captures.record(rows)
    expired = {r["prediction_id"] for r in rows if r["at"] < NOW - 30 * DAY}
    n = 6
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n
    errors: list[BaseException] = []

    def purge(i: int) -> None:
        own = MetadataStore(db_url, migrate=False)  # an engine of its own, as a process has
        try:
            barrier.wait(30)
            results[i] = own.captures.purge(NOW, max_total_bytes=900)
        except BaseException as err:  # reported below
            errors.append(err)
        finally:
            own.close()

    threads = [threading.Thread(target=purge, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    deleted = [r.prediction_id for res in results for r in res.deleted]
    orphaned = [d for res in results for d in res.orphaned]
    assert len(deleted) == len(set(deleted)), "a row was deleted by two purges"
    assert len(orphaned) == len(set(orphaned)), "a blob was orphaned by two purges"
    assert expired <= set(deleted)
    # 100 young rows of 10 bytes remain before the cap; the cap keeps 90 of them.
    assert len(deleted) == 110 and store.captures.count() == 90
    assert store.captures.total_bytes() == 900

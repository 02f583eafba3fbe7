"""Captured production images: one row per kept request image, linked to its prediction.

The image itself is a blob in the content-addressed artifact store (``sha256``); the same
bytes sent twice are one blob referenced by two rows. A row expires at ``expires_at``
(its retention) and is then deleted by ``purge``, unless a labelled dataset version
references it (``dataset_version``, set by ``mark_used``). Beyond the size cap the oldest
unreferenced rows go first.

Blobs are deleted only after their last row: ``purge`` returns the digests it orphaned,
and ``delete_blobs`` deletes each one while holding the captures lock, after checking
again that no row references it. ``record`` takes the same lock, and a server records
its rows before it stores their blobs (``CaptureWriter``): a new row for an orphaned
digest either comes first (the blob is kept) or after the delete (its put stores the
bytes again).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import Table, delete, func, or_, select, update

from loopline.drivers.metadata.database import Database
from loopline.drivers.metadata.models import Capture

COLUMNS = ("prediction_id", "sha256", "bytes", "media_type", "environment", "at", "expires_at")
_CHUNK = 500  # ids per IN (...) list, well under every backend's parameter limit
_LOCK = "loopline.captures"


def _utc(ts: datetime) -> datetime:
    """An aware UTC time (SQLite hands back naive ones; naive input is taken as UTC)."""
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


@dataclass(frozen=True)
class CaptureRecord:
    """A capture as read: plain values, safe to pass between threads."""

    prediction_id: str
    sha256: str
    bytes: int
    media_type: str
    environment: str | None
    at: datetime
    expires_at: datetime
    dataset_version: str | None

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["at"] = self.at.isoformat()
        out["expires_at"] = self.expires_at.isoformat()
        return out


def _record(row: Capture) -> CaptureRecord:
    return CaptureRecord(
        row.prediction_id, row.sha256, row.bytes, row.media_type, row.environment,
        _utc(row.at), _utc(row.expires_at), row.dataset_version,
    )  # fmt: skip


@dataclass(frozen=True)
class PurgeResult:
    """What a purge deleted (or, with ``dry_run``, would delete)."""

    expired: list[CaptureRecord] = field(default_factory=list)  # past their retention
    over_cap: list[CaptureRecord] = field(default_factory=list)  # oldest, beyond the size cap
    orphaned: list[str] = field(default_factory=list)  # digests no row references any more
    remaining_rows: int = 0
    remaining_bytes: int = 0  # of distinct blobs still referenced
    dry_run: bool = False

    @property
    def deleted(self) -> list[CaptureRecord]:
        return [*self.expired, *self.over_cap]

    def to_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "expired": [r.prediction_id for r in self.expired],
            "over_cap": [r.prediction_id for r in self.over_cap],
            "deleted_rows": len(self.deleted),
            "orphaned_blobs": list(self.orphaned),
            "remaining_rows": self.remaining_rows,
            "remaining_bytes": self.remaining_bytes,
        }


class CaptureRepository:
    """``store.captures``: record captured images, read them, purge them by retention."""

    def __init__(self, db: Database) -> None:
        self._db = db

    # -- writing ---------------------------------------------------------------------------
    def record(self, rows: list[dict[str, Any]]) -> int:
        """Insert capture rows (``COLUMNS``) in one transaction; a known prediction_id is
        skipped, so a retried write is safe. Returns how many rows were given."""
        if not rows:
            return 0
        clean: list[dict[str, Any]] = [{k: r.get(k) for k in COLUMNS} for r in rows]
        for r in clean:
            r["at"], r["expires_at"] = _utc(r["at"]), _utc(r["expires_at"])
        stmt = self._db.insert(cast(Table, Capture.__table__)).on_conflict_do_nothing(
            index_elements=["prediction_id"]
        )
        with self._db.write() as s:
            self._db.lock(s, _LOCK)
            s.execute(stmt, clean)
        return len(rows)

    def forget(self, prediction_ids: Iterable[str]) -> int:
        """Delete these capture rows (their image could not be stored); how many."""
        ids = sorted(set(prediction_ids))
        gone = 0
        with self._db.write() as s:
            for i in range(0, len(ids), _CHUNK):
                q = delete(Capture).where(Capture.prediction_id.in_(ids[i : i + _CHUNK]))
                gone += int(getattr(s.execute(q), "rowcount", 0) or 0)
        return gone

    def mark_used(self, prediction_ids: Iterable[str], dataset_version: str) -> int:
        """Mark captures as used by a labelled dataset version: purge keeps them.

        A capture keeps the first dataset version that used it (any one keeps it alive).
        Returns how many rows were newly marked.
        """
        ids = sorted(set(prediction_ids))
        marked = 0
        with self._db.write() as s:
            for i in range(0, len(ids), _CHUNK):
                q = (
                    update(Capture)
                    .where(Capture.prediction_id.in_(ids[i : i + _CHUNK]))
                    .where(Capture.dataset_version.is_(None))
                    .values(dataset_version=dataset_version)
                )
                marked += int(getattr(s.execute(q), "rowcount", 0) or 0)
        return marked

    def unmark(self, dataset_version: str) -> int:
        """Forget a dataset version's references (it was deleted): retention applies again."""
        with self._db.write() as s:
            q = (
                update(Capture)
                .where(Capture.dataset_version == dataset_version)
                .values(dataset_version=None)
            )
            return int(getattr(s.execute(q), "rowcount", 0) or 0)

    # -- reading ---------------------------------------------------------------------------
    def get(self, prediction_id: str) -> CaptureRecord | None:
        with self._db.read() as s:
            row = s.get(Capture, prediction_id)
            return _record(row) if row is not None else None

    def recent(
        self,
        limit: int | None = None,
        *,
        environment: str | None = None,
        dataset_version: str | None = None,
    ) -> list[CaptureRecord]:
        """Captures, newest first, filtered as given."""
        q = _filter(select(Capture), environment, dataset_version)
        q = q.order_by(Capture.at.desc(), Capture.prediction_id)
        if limit is not None:
            q = q.limit(limit)
        with self._db.read() as s:
            return [_record(r) for r in s.scalars(q)]

    def count(self, *, environment: str | None = None, dataset_version: str | None = None) -> int:
        q = _filter(select(func.count()).select_from(Capture), environment, dataset_version)
        with self._db.read() as s:
            return int(s.scalar(q) or 0)

    def total_bytes(self) -> int:
        """Bytes of the distinct blobs the captures reference (each stored once)."""
        with self._db.read() as s:
            return _total_bytes(s)

    def referenced(self, digests: Iterable[str]) -> set[str]:
        """Which of ``digests`` some capture still references."""
        wanted = sorted(set(digests))
        with self._db.read() as s:
            return _referenced(s, wanted)

    def expired(
        self, now: datetime | None = None, retention: timedelta | None = None
    ) -> list[CaptureRecord]:
        """Captures past their retention that no dataset version references, oldest first.

        A capture expires at its ``expires_at`` or, with ``retention``, once it is older
        than that: a policy shortened since it was captured applies at once.
        """
        with self._db.read() as s:
            return [_record(r) for r in s.scalars(_expired_query(_utc(now or _now()), retention))]

    # -- purging ---------------------------------------------------------------------------
    def purge(
        self,
        now: datetime | None = None,
        max_total_bytes: int | None = None,
        *,
        retention: timedelta | None = None,
        dry_run: bool = False,
    ) -> PurgeResult:
        """Delete expired unreferenced captures (see ``expired``), then the oldest
        unreferenced ones until the distinct blobs left fit ``max_total_bytes``; all in one
        serialised transaction.

        Returns what was deleted and the digests no row references any more (delete their
        blobs with ``delete_blobs``). With ``dry_run`` nothing changes.
        """
        now = _utc(now or _now())
        with self._db.write() as s:
            self._db.lock(s, _LOCK)
            expired = [_record(r) for r in s.scalars(_expired_query(now, retention))]
            gone = {r.prediction_id for r in expired}
            # Distinct blobs and how many rows still use each, once the expired rows are gone.
            users: dict[str, int] = {}
            sizes: dict[str, int] = {}
            q = select(Capture.sha256, func.count(), func.max(Capture.bytes)).group_by(
                Capture.sha256
            )
            for digest, n, size in s.execute(q):
                users[digest] = int(n)
                sizes[digest] = int(size or 0)
            for r in expired:
                users[r.sha256] -= 1
            total = sum(sizes[d] for d, n in users.items() if n > 0)
            over: list[CaptureRecord] = []
            if max_total_bytes is not None and total > max_total_bytes:
                oldest = (
                    select(Capture)
                    .where(Capture.dataset_version.is_(None))
                    .order_by(Capture.at, Capture.prediction_id)
                    .execution_options(yield_per=1000)
                )
                rows = s.scalars(oldest)
                try:
                    for row in rows:
                        if total <= max_total_bytes:
                            break
                        if row.prediction_id in gone:
                            continue
                        rec = _record(row)
                        over.append(rec)
                        users[rec.sha256] -= 1
                        if users[rec.sha256] == 0:
                            total -= sizes[rec.sha256]
                finally:
                    rows.close()
            deleted = [*expired, *over]
            orphaned = sorted({r.sha256 for r in deleted if users[r.sha256] == 0})
            remaining = sum(users.values())
            if not dry_run:
                ids = [r.prediction_id for r in deleted]
                for i in range(0, len(ids), _CHUNK):
                    s.execute(delete(Capture).where(Capture.prediction_id.in_(ids[i : i + _CHUNK])))
                # Re-check inside the transaction: nothing may orphan a digest still in use.
                orphaned = sorted(set(orphaned) - _referenced(s, orphaned))
        return PurgeResult(expired, over, orphaned, remaining, total, dry_run)

    def delete_blobs(self, digests: Iterable[str], delete_blob: Callable[[str], Any]) -> list[str]:
        """Call ``delete_blob(digest)`` for each digest no capture references, under the
        captures lock (a concurrent ``record`` waits); returns the digests deleted."""
        wanted = sorted(set(digests))
        done: list[str] = []
        for i in range(0, len(wanted), _CHUNK):
            chunk = wanted[i : i + _CHUNK]
            with self._db.write() as s:
                self._db.lock(s, _LOCK)
                used = _referenced(s, chunk)
                for digest in chunk:
                    if digest not in used:
                        delete_blob(digest)
                        done.append(digest)
        return done


def _now() -> datetime:
    return datetime.now(UTC)


def _expired_query(now: datetime, retention: timedelta | None = None) -> Any:
    due = Capture.expires_at <= now
    if retention is not None:
        due = or_(due, Capture.at <= now - retention)
    return (
        select(Capture)
        .where(due)
        .where(Capture.dataset_version.is_(None))
        .order_by(Capture.at, Capture.prediction_id)
    )


def _referenced(s: Any, digests: list[str]) -> set[str]:
    out: set[str] = set()
    for i in range(0, len(digests), _CHUNK):
        q = select(Capture.sha256).where(Capture.sha256.in_(digests[i : i + _CHUNK])).distinct()
        out.update(s.scalars(q))
    return out


def _total_bytes(s: Any) -> int:
    per_blob = select(func.max(Capture.bytes).label("n")).group_by(Capture.sha256).subquery()
    return int(s.scalar(select(func.coalesce(func.sum(per_blob.c.n), 0))) or 0)


def _filter(q: Any, environment: str | None, dataset_version: str | None) -> Any:
    if environment is not None:
        q = q.where(Capture.environment == environment)
    if dataset_version is not None:
        q = q.where(Capture.dataset_version == dataset_version)
    return q

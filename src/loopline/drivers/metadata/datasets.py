"""Dataset versions: immutable, content-addressed sets of records read from a source."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from loopline.drivers.metadata.database import Database
from loopline.drivers.metadata.models import DatasetVersion, utcnow
from loopline.errors import NotFound


class DatasetRepository:
    """``store.datasets``: record, find and list dataset versions."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def add(
        self,
        *,
        version: str,
        name: str,
        source_uri: str,
        n_records: int,
        records_sha256: str,
        stats: dict[str, Any] | None = None,
        created_by_run: str | None = None,
    ) -> DatasetVersion:
        """Record a dataset version; one already stored is kept and returned as stored.

        Atomic: concurrent callers recording the same version all get the one row.
        """
        values = dict(
            version=version,
            name=name,
            source_uri=source_uri,
            n_records=n_records,
            records_sha256=records_sha256,
            stats=stats or {},
            created_at=utcnow(),
            created_by_run=created_by_run,
        )
        stmt = self._db.insert(DatasetVersion).values(**values)
        with self._db.write() as s:
            s.execute(stmt.on_conflict_do_nothing(index_elements=["version"]))
            row = s.get(DatasetVersion, version)
            assert row is not None  # inserted above or by the caller that won
            return row

    def get(self, version: str) -> DatasetVersion:
        """A version by its id or by a unique prefix of it."""
        with self._db.read() as s:
            row = s.get(DatasetVersion, version)
            if row is not None:
                return row
            q = select(DatasetVersion).where(DatasetVersion.version.startswith(version))
            matches = list(s.scalars(q.limit(2)))
        if len(matches) == 1:
            return matches[0]
        raise NotFound(f"no dataset version {version!r} (see `loopline datasets`)")

    def all(self) -> list[DatasetVersion]:
        """Every dataset version, oldest first."""
        with self._db.read() as s:
            return list(s.scalars(select(DatasetVersion).order_by(DatasetVersion.created_at)))

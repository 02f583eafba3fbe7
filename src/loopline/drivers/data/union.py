"""Several data sources read as one: ``data.source``'s records, then each of ``data.also``'s.

Paths name records across all of them, so two sources listing one path is refused (the
dataset could not say whose bytes it holds). Each read goes to the source that lists the
path; the fingerprint combines every source's.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pandas as pd

from loopline.digest import sha256_bytes
from loopline.drivers.data import DataSource
from loopline.errors import DataSourceError


class UnionSource:
    """``primary``'s records followed by each of ``extras``'."""

    def __init__(self, primary: DataSource, extras: Sequence[DataSource]) -> None:
        self.primary = primary
        self.extras = list(extras)
        self.sources: list[DataSource] = [primary, *self.extras]
        self.uri = " + ".join(s.uri for s in self.sources)
        self._lock = threading.RLock()
        self._owner: dict[str, int] | None = None  # path -> index into ``sources``

    def list_records(self) -> pd.DataFrame:
        return self.combine(self.primary.list_records())

    def combine(self, primary_records: pd.DataFrame) -> pd.DataFrame:
        """``primary_records`` (the primary's, maybe filtered) and every extra's, appended.

        DataSourceError when two sources list the same path.
        """
        frames = [primary_records] + [s.list_records() for s in self.extras]
        owner: dict[str, int] = {}
        for i, df in enumerate(frames):
            for path in df["path"].astype(str):
                first = owner.setdefault(path, i)
                if first != i:
                    raise DataSourceError(
                        f"path {path!r} is listed by both {self.sources[first].uri} and "
                        f"{self.sources[i].uri}; paths must be unique across data.source and "
                        "data.also"
                    )
        with self._lock:
            self._owner = owner
        kept = [f.reset_index(drop=True) for f in frames if len(f)] or [frames[0]]
        return pd.concat(kept, ignore_index=True, sort=False)

    def fingerprint(self) -> str:
        parts = [f"{s.uri}\0{s.fingerprint()}" for s in self.sources]
        return sha256_bytes("\n".join(parts).encode())

    def read_bytes(self, path: str) -> bytes:
        with self._lock:
            if self._owner is None or path not in self._owner:
                self._route()
            index = (self._owner or {}).get(path)
        if index is None:
            raise DataSourceError(f"{path} is not listed by any source of {self.uri}")
        return self.sources[index].read_bytes(path)

    def _route(self) -> None:
        """Which source lists each path, over the unfiltered listings (read before listing,
        e.g. by a step after a cached ingest)."""
        owner: dict[str, int] = {}
        for i, source in enumerate(self.sources):
            for path in source.list_records()["path"].astype(str):
                owner.setdefault(path, i)
        self._owner = owner

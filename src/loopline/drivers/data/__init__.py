"""Data sources: where records (path, label, metadata) and image bytes come from.

Backends are picked by name from ``SOURCES`` (dotted paths, imported only when used).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Protocol

import pandas as pd

if TYPE_CHECKING:
    from loopline.config import Config


class DataSource(Protocol):
    """A source lists records and reads the bytes behind a record's ``path``."""

    uri: str

    def list_records(self) -> pd.DataFrame:
        """Columns ``path`` and ``label`` plus any metadata columns."""
        ...

    def read_bytes(self, path: str) -> bytes: ...

    def fingerprint(self) -> str:
        """A cheap digest that changes whenever the records or files change."""
        ...


SOURCES: dict[str, str] = {
    "lake": "loopline.drivers.data.lake:Lake",
    "warehouse": "loopline.drivers.data.warehouse:Warehouse",
}


def source_module(kind: str) -> str:
    """The module implementing the source ``kind`` (a key of ``SOURCES``)."""
    return SOURCES[kind].partition(":")[0]


def open_source(config: Config) -> DataSource:
    """Build the data source that ``config.data.source`` names."""
    src = config.data.source
    module, _, cls_name = SOURCES[src.kind].partition(":")
    cls: Any = getattr(importlib.import_module(module), cls_name)
    return cls.from_config(src, config.resolve)  # type: ignore[no-any-return]

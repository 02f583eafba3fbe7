"""Data sources: where records (path, label, metadata) and image bytes come from.

Backends are picked by name from ``SOURCES`` (dotted paths, imported only when used):
``lake`` (a folder or fsspec URL), ``warehouse`` (an SQL query) and ``captures`` (labelled
production captures from the project's own stores). With ``data.also``, ``open_source``
returns a ``UnionSource`` over ``data.source`` and each extra source.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Protocol

import pandas as pd

if TYPE_CHECKING:
    from loopline.config import Config, DataConfig, SourceConfig


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
    "captures": "loopline.drivers.data.captures:CapturesSource",
}
UNION_MODULE = "loopline.drivers.data.union"


def source_module(kind: str) -> str:
    """The module implementing the source ``kind`` (a key of ``SOURCES``)."""
    return SOURCES[kind].partition(":")[0]


def source_modules(data: DataConfig) -> list[str]:
    """Every module that reads ``data``'s records: each source's driver, and the union's."""
    kinds = [data.source.kind, *(s.kind for s in data.also)]
    modules = [source_module(k) for k in kinds] + ([UNION_MODULE] if data.also else [])
    return list(dict.fromkeys(modules))


def open_one(src: SourceConfig, config: Config) -> DataSource:
    """The source one ``SourceConfig`` names (a captures source over ``config``'s stores)."""
    module, _, cls_name = SOURCES[src.kind].partition(":")
    cls: Any = getattr(importlib.import_module(module), cls_name)
    if src.kind == "captures":
        return cls.from_config(src, config)  # type: ignore[no-any-return]
    return cls.from_config(src, config.resolve)  # type: ignore[no-any-return]


def open_source(config: Config) -> DataSource:
    """Build the data source that ``config.data`` names: ``source``, plus ``also`` if any."""
    primary = open_one(config.data.source, config)
    if not config.data.also:
        return primary
    from loopline.drivers.data.union import UnionSource

    return UnionSource(primary, [open_one(src, config) for src in config.data.also])

"""Ingest: read the source's records into a versioned dataset.

The dataset version is the sha256 of all records (path, label, metadata and the sha256 of
each file's bytes), so ingesting the same data twice gives the same version. The step only
returns the records and a description of the version; the recorder stores the version.

With ``data.also`` (e.g. the retrain loop's labelled production captures) the records are
``data.source``'s, then each extra source's. ``data.filter`` applies to ``data.source``'s
records only: the extra sources have other columns (a captures source has no
``condition``), and what they add was chosen by their own settings.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pandas as pd

from loopline.config import DataConfig
from loopline.digest import sha256_bytes
from loopline.pipeline import StepContext


def dataset_version(records: pd.DataFrame) -> str:
    """Content hash of a records table, independent of row order."""
    ordered = records.sort_values("path", kind="stable").reset_index(drop=True)
    ordered = ordered[sorted(ordered.columns)]
    return sha256_bytes(ordered.to_csv(index=False).encode())


def ingest(ctx: StepContext, params: DataConfig) -> dict[str, Any]:
    from loopline.drivers.data.union import UnionSource

    source = ctx.resources.source
    if isinstance(source, UnionSource):
        records = source.combine(apply_filter(source.primary.list_records(), params.filter))
    else:
        records = apply_filter(source.list_records(), params.filter)
    records = records.reset_index(drop=True)
    bar = ctx.progress(len(records), "hashing files")

    def digest(path: str) -> tuple[str, int]:
        try:
            data = source.read_bytes(path)
        except Exception as err:  # a missing or unsafe path is quarantined by validate
            ctx.log(f"unreadable {path}: {err}")
            return "", -1
        finally:
            bar.advance()
        return sha256_bytes(data), len(data)

    with ThreadPoolExecutor(max_workers=4) as pool:
        hashed = list(pool.map(digest, records["path"].tolist()))
    bar.close()
    records["sha256"] = [h for h, _ in hashed]
    records["bytes"] = [n for _, n in hashed]
    records = records.fillna("").astype({c: str for c in records.columns if c != "bytes"})
    version = dataset_version(records)
    records_sha = sha256_bytes(records.to_csv(index=False).encode())
    stats = {
        "labels": records["label"].value_counts().sort_index().to_dict(),
        "columns": list(records.columns),
    }
    ctx.log(f"dataset version {version[:12]}: {len(records)} records from {source.uri}")
    return {
        "records": records,
        "dataset": {
            "version": version,
            "n_records": len(records),
            "source": source.uri,
            "records_sha256": records_sha,
            "stats": stats,
        },
    }


def apply_filter(records: pd.DataFrame, wanted: dict[str, list[str]]) -> pd.DataFrame:
    """The records whose ``column`` value is one of the allowed, for each filtered column."""
    for column, allowed in wanted.items():
        if column not in records.columns:
            raise_missing(column, records)
        records = records[records[column].astype(str).isin([str(v) for v in allowed])]
    return records


def raise_missing(column: str, records: pd.DataFrame) -> None:
    from loopline.errors import ConfigError

    raise ConfigError(
        f"data.filter names column {column!r}, which the source lacks; "
        f"columns: {', '.join(records.columns)}"
    )


def source_fingerprint(ctx: StepContext, params: Any) -> str:
    """Cache extra for ingest: the step re-runs whenever the source's content changes."""
    source = ctx.resources.source
    return f"{source.uri}|{source.fingerprint()}"


def source_modules(params: DataConfig) -> list[str]:
    """Code modules for ingest: the driver of every configured source (``SOURCES[kind]``,
    ``data.source``'s and each of ``data.also``'s) and, with ``data.also``, the union's.

    The drivers are imported by name from a table, so no import scan reaches them; yet their
    ``list_records`` decides ingest's output, so their modules are part of ingest's code
    version.
    """
    from loopline.drivers.data import source_modules as modules

    return modules(params)

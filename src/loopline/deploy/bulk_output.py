"""The Parquet file of a bulk run: one row per predicted record, written all or nothing.

Columns: ``path``, ``sha256``, ``label`` (predicted), ``confidence``, ``prob_<label>`` per
class, ``true_label`` (null where the source has none), ``model_name``, ``model_version``,
then the source's metadata columns; one that clashes with these is kept as
``source_<name>``.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from loopline.deploy.runtime import ServedModel

ROW_GROUP_ROWS = 16384
RESERVED = ("path", "sha256", "label", "confidence", "true_label", "model_name", "model_version")


class PredictionWriter:
    """Streams row groups into a temporary file next to ``out``; ``commit`` renames it
    to ``out``, ``abort`` removes it. Counts rows, labelled rows and correct ones."""

    def __init__(self, out: Path, served: ServedModel, records: pd.DataFrame) -> None:
        import pyarrow as pa

        self.out = out
        self.labels = list(served.labels)
        self.name, self.version = served.name, served.version
        self.paths = records["path"].astype(str).to_numpy(dtype=object)
        truth = records["label"].fillna("").astype(str) if "label" in records else None
        self.truth = (
            truth.to_numpy(dtype=object) if truth is not None else np.full(len(records), "")
        )
        reserved = set(RESERVED) | {f"prob_{label}" for label in self.labels}
        meta = records.drop(columns=[c for c in ("path", "label", "sha256") if c in records])
        meta = meta.rename(columns={c: f"source_{c}" for c in meta.columns if c in reserved})
        self.meta = _arrow(meta)
        self.label_array = pa.array(self.labels, pa.string())
        self.rows = self.labelled = self.correct = 0
        self._parts: list[tuple[list[int], list[str], np.ndarray]] = []
        self._pending = 0
        self._writer: Any = None
        out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex}.part")

    def add(self, index: list[int], sha256: list[str], probs: np.ndarray) -> None:
        self._parts.append((index, sha256, probs))
        self._pending += len(index)
        if self._pending >= ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self._parts:
            index = np.concatenate([np.asarray(p[0], dtype=np.int64) for p in self._parts])
            sha = [s for p in self._parts for s in p[1]]
            probs = np.concatenate([p[2] for p in self._parts])
        else:
            index = np.zeros(0, np.int64)
            sha, probs = [], np.zeros((0, len(self.labels)), np.float32)
        self._parts, self._pending = [], 0
        top = probs.argmax(axis=1) if len(probs) else np.zeros(0, np.int64)
        truth = self.truth[index]
        known = truth != ""
        self.rows += len(index)
        self.labelled += int(known.sum())
        predicted = np.asarray(self.labels, dtype=object)[top]
        self.correct += int((predicted[known] == truth[known]).sum())
        columns: dict[str, Any] = {
            "path": pa.array(self.paths[index], pa.string()),
            "sha256": pa.array(sha, pa.string()),
            "label": self.label_array.take(pa.array(top, pa.int64())),
            "confidence": pa.array(probs[np.arange(len(probs)), top], pa.float32()),
        }
        for j, label in enumerate(self.labels):
            columns[f"prob_{label}"] = pa.array(probs[:, j], pa.float32())
        columns["true_label"] = pa.array(np.where(known, truth, None), pa.string())
        columns["model_name"] = pa.array([self.name] * len(index), pa.string())
        columns["model_version"] = pa.array(np.full(len(index), self.version, np.int64))
        meta = self.meta.take(pa.array(index, pa.int64()))
        for name in meta.column_names:
            columns[name] = meta.column(name)
        table = pa.table(columns)
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.tmp, table.schema)
        self._writer.write_table(table)

    def commit(self) -> None:
        if self._parts or self._writer is None:  # the rest, or an empty file with the schema
            self._flush()
        self._writer.close()
        self._writer = None
        os.replace(self.tmp, self.out)

    def abort(self) -> None:
        try:
            if self._writer is not None:
                self._writer.close()
        finally:
            self.tmp.unlink(missing_ok=True)


def _arrow(df: pd.DataFrame) -> Any:
    """The metadata columns as an Arrow table (a column of mixed types as strings)."""
    import pyarrow as pa

    df = df.reset_index(drop=True)
    for column in df.columns:
        try:
            pa.array(df[column], from_pandas=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            df[column] = df[column].map(lambda v: None if v is None else str(v))
    return pa.Table.from_pandas(df, preserve_index=False)

"""Decode a dataset's images into arrays, verifying each file against its recorded sha256."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd

from loopline.bundle import PreprocessSpec, decode_image
from loopline.digest import sha256_bytes
from loopline.errors import DataSourceError
from loopline.pipeline import StepContext


def load_images(
    ctx: StepContext, records: pd.DataFrame, size: int, what: str = "images"
) -> np.ndarray:
    """uint8 [N, size, size, 3] for ``records``; a file changed since ingest is an error."""
    source = ctx.resources.source
    spec = PreprocessSpec(height=size, width=size)
    out = np.empty((len(records), size, size, 3), dtype=np.uint8)
    bar = ctx.progress(len(records), f"decoding {what}")
    rows = list(zip(records["path"], records["sha256"], strict=True))

    def one(i: int) -> None:
        path, digest = rows[i]
        data = source.read_bytes(path)
        if sha256_bytes(data) != digest:
            raise DataSourceError(
                f"{path} changed since it was ingested (sha256 mismatch); re-run the build "
                "to ingest a new dataset version"
            )
        out[i] = decode_image(data, spec)
        bar.advance()

    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(one, range(len(rows))))
    bar.close()
    return out


def label_indices(records: pd.DataFrame, labels: list[str]) -> np.ndarray:
    index = {label: i for i, label in enumerate(labels)}
    return np.array([index[label] for label in records["label"]], dtype=np.int64)

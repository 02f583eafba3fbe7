"""How step outputs become bytes in the artifact store, and back.

Only data formats are used (JSON, Parquet, raw bytes, numpy ``.npz`` without pickle):
a stored artifact is never unpickled.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"cannot store {type(obj).__name__} as JSON")


def encode(value: Any) -> tuple[str, bytes]:
    """Pick a codec for ``value`` and encode it: returns (codec name, bytes)."""
    if isinstance(value, bytes):
        return "bytes", value
    if isinstance(value, dict) and value and all(isinstance(v, np.ndarray) for v in value.values()):
        objects = [name for name, v in value.items() if v.dtype.hasobject]
        if objects:  # np.savez would pickle them, and decode refuses pickles
            raise TypeError(
                f"array(s) {', '.join(map(str, objects))} hold Python objects; "
                "steps return numeric or string numpy arrays"
            )
        buf = io.BytesIO()
        np.savez(buf, **value)
        return "npz", buf.getvalue()
    if isinstance(value, dict | list | str | int | float | bool) or value is None:
        data = json.dumps(value, sort_keys=True, separators=(",", ":"), default=_json_default)
        return "json", data.encode()
    import pandas as pd

    if isinstance(value, pd.DataFrame):
        buf = io.BytesIO()
        value.to_parquet(buf, index=False)
        return "parquet", buf.getvalue()
    raise TypeError(
        f"a step returned {type(value).__name__}; steps return bytes, JSON-like values, "
        "a dict of numpy arrays or a pandas DataFrame"
    )


def decode(codec: str, data: bytes) -> Any:
    if codec == "bytes":
        return data
    if codec == "json":
        return json.loads(data)
    if codec == "npz":
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    if codec == "parquet":
        import pandas as pd

        return pd.read_parquet(io.BytesIO(data))
    raise ValueError(f"unknown codec {codec!r}")

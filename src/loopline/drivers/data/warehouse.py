"""A data warehouse: an SQL query over a SQLAlchemy URL returning ``path,label,...`` rows.

The query gives the records; the image bytes are read from ``images_root`` (a lake). The
URL's password is only used to connect: ``uri`` (what a dataset version records as its
source, and what logs show) and every error name the URL with the password masked.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pandas as pd
from sqlalchemy import create_engine, text
from sqlalchemy.exc import SQLAlchemyError

from loopline.credentials import expand_url, mask_url, scrub, url_secrets
from loopline.digest import sha256_bytes
from loopline.drivers.data.lake import Lake
from loopline.errors import DataSourceError


class Warehouse:
    """Records from an SQL query; ``url`` is what to connect with, ``shown_url`` (default
    ``url``) is the form to name it by, e.g. with an ``${ENV}`` reference unexpanded."""

    def __init__(
        self, url: str, query: str, images_root: str, *, shown_url: str | None = None
    ) -> None:
        self._url = url
        self.query = query
        self.uri = f"{mask_url(shown_url or url)} :: {query}"
        self.images = Lake(images_root, layout="folders")

    @classmethod
    def from_config(cls, src: Any, resolve: Callable[[str], str]) -> Warehouse:
        if not src.url or not src.query:
            raise DataSourceError("a warehouse source needs data.source.url and data.source.query")
        root = src.images_root or src.uri
        url = expand_url(src.url, "data.source.url")
        images = resolve(expand_url(root, "data.source.images_root"))
        return cls(url, src.query, images, shown_url=src.url)

    def list_records(self) -> pd.DataFrame:
        try:
            engine = create_engine(self._url)
            try:
                with engine.connect() as conn:
                    df = pd.read_sql_query(text(self.query), conn)
            finally:  # a failed query must not leave a pool of open connections behind
                engine.dispose()
        except (SQLAlchemyError, pd.errors.DatabaseError) as err:
            # pandas wraps a failed statement's SQLAlchemyError in its own DatabaseError.
            cause = err.__cause__ if isinstance(err.__cause__, SQLAlchemyError) else err
            first = scrub(str(cause).strip().splitlines()[0], *url_secrets(self._url))
            raise DataSourceError(f"warehouse query failed: {first}") from None
        missing = {"path", "label"} - set(df.columns)
        if missing:
            raise DataSourceError(
                f"warehouse query must return columns path,label; missing {', '.join(missing)}"
            )
        df = df.astype({"path": str})
        df["label"] = df["label"].fillna("").astype(str)
        return df

    def fingerprint(self) -> str:
        """Digest of the query's rows and of the images' listing."""
        rows = self.list_records().to_csv(index=False).encode()
        return sha256_bytes(rows + self.images.fingerprint().encode())

    def read_bytes(self, path: str) -> bytes:
        return self.images.read_bytes(path)

"""A data lake: a local folder or any fsspec URL holding images.

Two layouts: a manifest (CSV or Parquet with ``path,label`` and metadata columns) or one
folder per class. Every path is checked to stay inside the lake's root.
"""

from __future__ import annotations

import functools
import io
import os
import posixpath
from collections.abc import Callable
from functools import cached_property
from typing import Any

import fsspec
import pandas as pd

from loopline.credentials import expand_url, mask_url, scrub, url_secrets
from loopline.digest import sha256_bytes
from loopline.errors import DataSourceError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def safe_join(root: str, rel: str) -> str:
    """Join ``rel`` under ``root``; refuse absolute paths and any that climb out of root."""
    rel = str(rel).replace("\\", "/")
    if not rel or rel.startswith("/") or "://" in rel or (len(rel) > 1 and rel[1] == ":"):
        raise DataSourceError(f"path {rel!r} must be relative to the data root")
    norm = posixpath.normpath(rel)
    if norm == ".." or norm.startswith("../"):
        raise DataSourceError(f"path {rel!r} escapes the data root")
    return f"{root.rstrip('/')}/{norm}"


class Lake:
    """Images in a folder or object store, described by a manifest or by class folders."""

    def __init__(
        self,
        uri: str,
        layout: str = "auto",
        manifest: str = "manifest.csv",
        *,
        shown_uri: str | None = None,
    ) -> None:
        # ``uri`` opens the lake; ``self.uri`` names it (recorded, shown) without a password.
        self.uri = mask_url(shown_uri or uri)
        self.layout = layout
        self.manifest = manifest
        try:
            self.fs, self.root = fsspec.core.url_to_fs(uri)
        except (ImportError, ValueError) as err:
            reason = scrub(str(err), *url_secrets(uri))
            raise DataSourceError(f"unsupported data lake URL {self.uri!r}: {reason}") from None
        self.root = self.root.rstrip("/")
        self._local = "file" in (
            (self.fs.protocol,) if isinstance(self.fs.protocol, str) else self.fs.protocol
        )
        if not self.fs.isdir(self.root):
            raise DataSourceError(
                f"data lake not found: {self.uri} "
                f"(generate one with `loopline datagen --out {self.uri}`)"
            )

    @classmethod
    def from_config(cls, src: Any, resolve: Callable[[str], str]) -> Lake:
        uri = resolve(expand_url(src.uri, "data.source.uri"))
        shown = resolve(src.uri) if "://" not in src.uri else src.uri
        return cls(uri, layout=src.layout, manifest=src.manifest, shown_uri=shown)

    # -- records ---------------------------------------------------------------------------
    def list_records(self) -> pd.DataFrame:
        layout = self.layout
        if layout == "auto":
            layout = "manifest" if self.fs.exists(self._manifest_path()) else "folders"
        df = self._from_manifest() if layout == "manifest" else self._from_folders()
        return df.reset_index(drop=True)

    def _manifest_path(self) -> str:
        return safe_join(self.root, self.manifest)

    def _from_manifest(self) -> pd.DataFrame:
        path = self._manifest_path()
        if not self.fs.exists(path):
            raise DataSourceError(f"manifest {self.manifest} not found in {self.uri}")
        with self.fs.open(path, "rb") as f:
            raw = f.read()
        try:
            if self.manifest.endswith(".parquet"):
                df = pd.read_parquet(io.BytesIO(raw))
            else:
                df = pd.read_csv(io.BytesIO(raw), dtype=str, keep_default_na=False)
        except Exception as err:  # pandas raises many kinds for a broken file
            raise DataSourceError(f"cannot read manifest {self.manifest}: {err}") from None
        missing = {"path", "label"} - set(df.columns)
        if missing:
            raise DataSourceError(
                f"manifest {self.manifest} lacks column(s) {', '.join(sorted(missing))}; "
                "required: path,label (plus any metadata columns)"
            )
        df = df.astype({"path": str})
        # A Parquet manifest holds nulls where a CSV holds "": both mean unlabelled, not "None".
        df["label"] = df["label"].fillna("").astype(str)
        return df

    def _from_folders(self) -> pd.DataFrame:
        rows = []
        for path in sorted(self.fs.find(self.root)):
            rel = path[len(self.root) + 1 :]
            parts = rel.split("/")
            if len(parts) < 2 or not rel.lower().endswith(IMAGE_SUFFIXES):
                continue
            rows.append({"path": rel, "label": parts[0]})
        if not rows:
            raise DataSourceError(
                f"no images found in {self.uri}: expected a {self.manifest} or one folder "
                "per class (e.g. car/0001.png)"
            )
        return pd.DataFrame(rows)

    @cached_property
    def _real_root(self) -> str:
        return os.path.realpath(self.root)

    @functools.lru_cache(maxsize=4096)  # noqa: B019 - one lake object per build
    def _real_dir(self, folder: str) -> str:
        return os.path.realpath(folder)

    def fingerprint(self) -> str:
        """A cheap digest of the lake's listing (path, size, mtime): changes when files do."""
        lines = []
        for path, info in sorted(self.fs.find(self.root, detail=True).items()):
            mtime = info.get("mtime") or info.get("LastModified") or info.get("created") or ""
            lines.append(f"{path}\0{info.get('size')}\0{mtime}\n")
        return sha256_bytes("".join(lines).encode())

    # -- bytes -----------------------------------------------------------------------------
    def read_bytes(self, path: str) -> bytes:
        full = safe_join(self.root, path)
        try:
            if self._local:
                # A link (of the file or of a folder above it) may not lead out of the root.
                real = self._real_dir(os.path.dirname(full))
                if os.path.islink(full):
                    real = os.path.realpath(full)
                if not real.startswith(self._real_root + os.sep) and real != self._real_root:
                    raise DataSourceError(f"path {path!r} escapes the data root (via a link)")
                with open(full, "rb") as fh:  # plain open: fsspec's costs ~3x per small file
                    return fh.read()
            with self.fs.open(full, "rb") as f:
                data: bytes = f.read()
                return data
        except (FileNotFoundError, NotADirectoryError):
            raise DataSourceError(f"{path} is listed but missing from {self.uri}") from None

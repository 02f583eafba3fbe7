"""What a bulk or replica run reads: a model (registry reference or bundle) and a source.

``resolve_model`` loads ``NAME[:VERSION|@ALIAS]`` from the registry, its bundle checked
against the registered sha256 and every file against the manifest, or a bundle folder or
tar; ``open_data_source`` opens a lake folder or URL, or the ``data.source`` of a config.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from loopline.bundle import Bundle, extract_bundle, fetch_bundle, load_bundle
from loopline.deploy.runtime import ModelRuntime, ServedModel
from loopline.digest import sha256_file
from loopline.errors import ConfigError, DataSourceError, IntegrityError, NotFound

if TYPE_CHECKING:
    from loopline.drivers.data import DataSource


def resolve_model(
    model: str | Path, *, config: str | Path | None = None, intra_op_threads: int = 1
) -> ServedModel:
    """Load ``NAME[:VERSION|@ALIAS]`` from the registry (its tar checked against the
    registered sha256, then every file against the manifest) or a bundle folder or tar.

    A bundle is named by its registered identity when the project's registry holds it (by
    sha256), else by its metadata (version 0 when it has none: it is not registered).
    """
    path = Path(model)
    with tempfile.TemporaryDirectory(prefix="loopline-predict-") as tmp:
        if path.exists():
            bundle, digest = _open_bundle(path, Path(tmp))
            name, version = _bundle_identity(bundle, path, digest, config)
        elif str(model).endswith((".tar", "/")) or os.sep in str(model):
            raise NotFound(f"bundle {model} does not exist")
        else:
            from loopline.config import load_config, require_project
            from loopline.drivers.artifacts.store import ArtifactStore
            from loopline.drivers.metadata.store import MetadataStore

            require_project(config)
            cfg = load_config(config)
            store = MetadataStore(cfg.metadata_url())
            try:
                mv = store.models.resolve(str(model))
            finally:
                store.close()
            name, version, digest = mv.name, mv.version, mv.bundle_sha256
            try:
                bundle = fetch_bundle(ArtifactStore(cfg.artifacts_url()), digest, Path(tmp))
            except IntegrityError as err:
                raise IntegrityError(f"refusing to use {name}:{version}: {err}") from None
        runtime = ModelRuntime(
            bundle.model_path,
            bundle.labels,
            bundle.preprocess,
            intra_op_threads=intra_op_threads,
            inter_op_threads=1,
        )
    return ServedModel(name, version, bundle, digest, runtime)


def _bundle_identity(
    bundle: Bundle, path: Path, digest: str, config: str | Path | None
) -> tuple[str, int]:
    from loopline.config import load_config, require_project
    from loopline.deploy.identity import registered_as, tar_digest
    from loopline.drivers.metadata.store import MetadataStore

    meta = bundle.metadata
    name = str(meta.get("name") or "model")
    version = meta.get("version")
    if isinstance(version, int) and version > 0:
        return name, version
    try:  # a project at hand: never create an empty store just to look in it
        require_project(config)
    except ConfigError:
        return name, 0
    store = MetadataStore(load_config(config).metadata_url())
    try:
        found = registered_as(store, tar_digest(path, digest), name)
    finally:
        store.close()
    return found if found is not None else (name, 0)


def _open_bundle(path: Path, tmp: Path) -> tuple[Bundle, str]:
    try:
        if path.is_file():
            digest = sha256_file(path)
            return load_bundle(extract_bundle(path, tmp / digest)), digest
        return load_bundle(path), sha256_file(path / "MANIFEST.json")
    except IntegrityError as err:
        raise IntegrityError(f"refusing to use bundle {path}: {err}") from None


def open_data_source(source: str | Path) -> tuple[DataSource, dict[str, list[str]]]:
    """A lake folder or fsspec URL, or a config file whose ``data.source`` (lake or
    warehouse) is used with its ``data.filter``; returns the source and the filter."""
    from loopline.drivers.data.lake import Lake

    text = str(source)
    path = Path(text)
    if "://" in text or path.is_dir():
        return Lake(text), {}
    if path.is_file():
        if path.suffix.lower() not in (".yaml", ".yml"):
            raise ConfigError(
                f"--source {text}: a file must be a loopline.yaml whose data.source is read; "
                "otherwise give a lake folder or URL"
            )
        from loopline.config import load_config
        from loopline.drivers.data import open_source

        cfg = load_config(path)
        return open_source(cfg), dict(cfg.data.filter)
    raise DataSourceError(
        f"--source {text} does not exist: give a lake folder or URL, or a loopline.yaml"
    )


def select_records(
    records: pd.DataFrame, filters: dict[str, list[str]], limit: int | None
) -> pd.DataFrame:
    for column, allowed in filters.items():
        if column not in records.columns:
            raise ConfigError(
                f"data.filter names column {column!r}, which the source lacks; "
                f"columns: {', '.join(records.columns)}"
            )
        records = records[records[column].astype(str).isin([str(v) for v in allowed])]
    if limit is not None:
        records = records.iloc[:limit]
    return records.reset_index(drop=True)

"""The registry identity of a bundle served without the registry (``--bundle``).

A served model always answers with its registered name and version (``vehicles:3``, never
version 0), so that its predictions join the registry, its feedback and its deployments.
A bare bundle gets it from ``--model-version`` (or ``LOOPLINE_MODEL_VERSION``), else from
the registry by the bundle's sha256 when a store is at hand; otherwise the server refuses
to start and says how to give it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loopline.bundle import MANIFEST, Bundle, write_bundle
from loopline.errors import ConfigError

if TYPE_CHECKING:
    from loopline.drivers.metadata.store import MetadataStore


def tar_digest(path: Path, digest: str) -> str:
    """The sha256 the registry knows a bundle by: its tar's, rebuilt for a folder.

    Bundle tars are deterministic, so the files a folder's manifest lists give back the
    registered tar, byte for byte.
    """
    if path.is_file():
        return digest
    import json

    listed = json.loads((path / MANIFEST).read_text())["files"]
    files = {name: (path / name).read_bytes() for name in listed}
    with tempfile.TemporaryDirectory(prefix="loopline-digest-") as tmp:
        return write_bundle(files, Path(tmp) / "bundle.tar")


def registered_as(store: MetadataStore, sha256: str, name: str | None) -> tuple[str, int] | None:
    """The (name, version) registered with this bundle sha256 (``name``'s first, if given)."""
    found = [
        mv for mv in store.models.versions(include_archived=True) if mv.bundle_sha256 == sha256
    ]
    found.sort(key=lambda mv: (mv.name != name, mv.archived_at is not None, -mv.version))
    return (found[0].name, found[0].version) if found else None


def bundle_identity(
    bundle: Bundle,
    path: Path,
    digest: str,
    *,
    name: str,
    version: int | None,
    env_version: str | None,
    store: Any | None,
) -> tuple[str, int]:
    """(name, version) to serve ``bundle`` as; ConfigError when it cannot be known."""
    if version is None and env_version:
        try:
            version = int(env_version)
        except ValueError:
            raise ConfigError(
                f"LOOPLINE_MODEL_VERSION={env_version!r} is not a version number"
            ) from None
    meta_version = bundle.metadata.get("version")
    if version is None and isinstance(meta_version, int) and meta_version > 0:
        version = meta_version
    if version is None and store is not None:
        sha = tar_digest(path, digest)
        found = registered_as(store, sha, name)
        if found is not None:
            return found
    if version is None:
        where = (
            "the registry holds no bundle with its sha256"
            if store is not None
            else "no metadata store to look it up in"
        )
        raise ConfigError(
            f"cannot tell which registered version bundle {path} is ({where}): give it with "
            "--model-version N (or LOOPLINE_MODEL_VERSION=N), or serve NAME:VERSION from "
            "the registry"
        )
    if version < 1:
        raise ConfigError(f"model version {version}: registry versions start at 1")
    return name, version

"""A content-addressed artifact store over any fsspec filesystem.

Artifacts are stored under ``<root>/sha256/<aa>/<digest>``. Hashing, atomic writes and
verification live here, once, above every backend: a write goes to a temporary name and is
moved into place only when complete, and every read re-hashes the bytes and refuses a
mismatch. The backend itself is plain fsspec (a local folder, ``s3://``, ``memory://``...).
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import fsspec

from loopline.digest import CHUNK, sha256_bytes, sha256_file, sha256_stream
from loopline.errors import IntegrityError, NotFound, StoreError

_HEX = set("0123456789abcdef")


@dataclass(frozen=True)
class ArtifactRef:
    """What a stored artifact is: its digest, size and where it lives."""

    sha256: str
    size: int
    uri: str

    def to_dict(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "size": self.size, "uri": self.uri}


def _check_digest(digest: str) -> str:
    if len(digest) != 64 or not set(digest) <= _HEX:
        raise NotFound(f"invalid artifact digest {digest!r}: expected 64 lowercase hex characters")
    return digest


class ArtifactStore:
    """Put bytes or files by content; get them back verified."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url)
        except (ImportError, ValueError) as err:
            raise StoreError(f"unsupported artifact store URL {url!r}: {err}") from None
        self.root = self.root.rstrip("/")
        self._local = "file" in _protocols(self.fs)
        try:
            self.fs.makedirs(f"{self.root}/sha256", exist_ok=True)
            self.fs.makedirs(f"{self.root}/tmp", exist_ok=True)
        except OSError as err:
            raise StoreError(f"cannot use artifact store {url!r}: {err}") from None

    # -- naming --------------------------------------------------------------------------
    def _path(self, digest: str) -> str:
        digest = _check_digest(digest)
        return f"{self.root}/sha256/{digest[:2]}/{digest}"

    def uri(self, digest: str) -> str:
        path = self._path(digest)
        protocol = _protocols(self.fs)[0]
        return path if protocol == "file" else f"{protocol}://{path}"

    def exists(self, digest: str) -> bool:
        return bool(self.fs.exists(self._path(digest)))

    def delete(self, digest: str) -> bool:
        """Remove an artifact (False: it was not there). The store keeps no references:
        the caller decides that nothing needs it any more."""
        try:
            self.fs.rm(self._path(digest))
        except FileNotFoundError:
            return False
        return True

    # -- writing -------------------------------------------------------------------------
    def put_bytes(self, data: bytes, *, durable: bool = True) -> ArtifactRef:
        """Store ``data``; ``durable=False`` (many small blobs: captured request images)
        skips the fsync, and on a local folder writes with plain system calls: a crash may
        lose such a blob, never make a wrong one readable (every read verifies)."""
        digest = sha256_bytes(data)
        if not durable and self._local:
            self._put_local(digest, data)
        elif not self.exists(digest):
            self._commit(digest, lambda f: f.write(data))
        return ArtifactRef(digest, len(data), self.uri(digest))

    def _put_local(self, digest: str, data: bytes) -> None:
        final = self._path(digest)
        if os.path.exists(final):
            return
        # The bytes were hashed in memory and cannot change: no read-back is needed.
        tmp = f"{self.root}/tmp/{digest}.{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            try:
                os.replace(tmp, final)
            except FileNotFoundError:  # the first blob of its folder
                os.makedirs(os.path.dirname(final), exist_ok=True)
                os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def put_json(self, obj: Any) -> ArtifactRef:
        return self.put_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode())

    def put_file(self, path: str | Path) -> ArtifactRef:
        digest = sha256_file(path)
        size = os.path.getsize(path)
        if not self.exists(digest):

            def copy(f: IO[bytes]) -> None:
                with open(path, "rb") as src:
                    while chunk := src.read(CHUNK):
                        f.write(chunk)

            self._commit(digest, copy)
        return ArtifactRef(digest, size, self.uri(digest))

    def _commit(self, digest: str, write: Any) -> None:
        final = self._path(digest)
        tmp = f"{self.root}/tmp/{digest}.{uuid.uuid4().hex}"
        try:
            with self.fs.open(tmp, "wb") as f:
                write(f)
                if self._local:
                    f.flush()
                    os.fsync(f.fileno())
            # Check the bytes before they get the digest's name: a source that changed while
            # it was copied must not land under a name it does not match.
            self._verify(tmp, digest)
            self.fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
            self.fs.mv(tmp, final)
        finally:
            if self.fs.exists(tmp):
                self.fs.rm(tmp)
        if not self._local:
            # Re-check what landed, so a faulty backend cannot register a bad digest.
            try:
                self._verify(final, digest)
            except IntegrityError:
                self.fs.rm(final)
                raise

    # -- reading -------------------------------------------------------------------------
    def _verify(self, path: str, digest: str) -> None:
        with self.fs.open(path, "rb") as f:
            _check(digest, sha256_stream(f))

    def get_bytes(self, digest: str) -> bytes:
        path = self._path(digest)
        try:
            with self.fs.open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise NotFound(f"artifact sha256:{digest} is missing from {self.url}") from None
        _check(digest, sha256_bytes(data))
        return data

    def get_json(self, digest: str) -> Any:
        return json.loads(self.get_bytes(digest))

    def get_file(self, digest: str, dest: str | Path) -> Path:
        """Copy an artifact to a local file, verified; ``dest`` appears only when complete."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.part")
        try:
            try:
                src = self.fs.open(self._path(digest), "rb")
            except FileNotFoundError:
                raise NotFound(f"artifact sha256:{digest} is missing from {self.url}") from None
            with src, open(tmp, "wb") as out:
                actual = sha256_stream(src, copy_to=out)
            _check(digest, actual)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return dest


def _check(digest: str, actual: str) -> None:
    if actual != digest:
        raise IntegrityError(
            f"artifact sha256:{digest[:12]} is corrupt or tampered with "
            f"(content hashes to {actual[:12]}); refusing to use it"
        )


def _protocols(fs: Any) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)

"""Conformance suite of the artifact store: a local folder, ``memory://`` and S3 (moto)."""

from __future__ import annotations

import hashlib
import io
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import loopline.drivers.artifacts.store as store_module
from loopline.drivers.artifacts import ArtifactStore
from loopline.errors import IntegrityError, NotFound, StoreError


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """A real S3 API on loopback: moto's server (no AWS account, no network)."""
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture(params=["local", "memory", "s3"])
def artifacts(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[ArtifactStore]:
    if request.param == "local":
        yield ArtifactStore(str(tmp_path / "artifacts"))
        return
    if request.param == "s3":
        import boto3
        import fsspec

        endpoint = request.getfixturevalue("s3_endpoint")
        for key, value in {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }.items():
            monkeypatch.setenv(key, value)
        bucket = f"loopline-{uuid.uuid4().hex[:12]}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        fsspec.filesystem("s3").invalidate_cache()
        yield ArtifactStore(f"s3://{bucket}/artifacts")
        return
    root = f"memory://loopline-test-{uuid.uuid4().hex}"
    store = ArtifactStore(root)
    yield store
    store.fs.rm(store.root, recursive=True)


def _objects(store: ArtifactStore) -> list[str]:
    return [p for p in store.fs.find(f"{store.root}/sha256")]


def _temps(store: ArtifactStore) -> list[str]:
    return list(store.fs.find(f"{store.root}/tmp"))


def _tamper(store: ArtifactStore, digest: str, data: bytes) -> None:
    """Overwrite a stored object behind the store's back (on disk, or through the fs)."""
    path = store._path(digest)
    if store._local:
        Path(path).write_bytes(data)
    else:
        store.fs.pipe_file(path, data)


def test_bytes_round_trip(artifacts: ArtifactStore) -> None:
    data = b"hello artifacts" * 1000
    ref = artifacts.put_bytes(data)
    assert ref.sha256 == hashlib.sha256(data).hexdigest()
    assert ref.size == len(data)
    assert ref.uri.endswith(f"sha256/{ref.sha256[:2]}/{ref.sha256}")
    assert artifacts.exists(ref.sha256)
    assert artifacts.get_bytes(ref.sha256) == data
    assert ref.to_dict() == {"sha256": ref.sha256, "size": ref.size, "uri": ref.uri}


def test_json_round_trip(artifacts: ArtifactStore) -> None:
    ref = artifacts.put_json({"b": [1, 2], "a": "x"})
    assert artifacts.get_json(ref.sha256) == {"a": "x", "b": [1, 2]}
    assert artifacts.put_json({"a": "x", "b": [1, 2]}).sha256 == ref.sha256  # key order


def test_file_round_trip(artifacts: ArtifactStore, tmp_path: Path) -> None:
    src = tmp_path / "model.bin"
    src.write_bytes(bytes(range(256)) * 5000)  # > one 1 MiB chunk
    ref = artifacts.put_file(src)
    assert ref.sha256 == hashlib.sha256(src.read_bytes()).hexdigest()
    assert ref.size == src.stat().st_size
    dest = artifacts.get_file(ref.sha256, tmp_path / "out" / "copy.bin")
    assert dest == tmp_path / "out" / "copy.bin"
    assert dest.read_bytes() == src.read_bytes()
    assert artifacts.get_bytes(ref.sha256) == src.read_bytes()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["copy.bin"]


def test_same_content_is_stored_once(artifacts: ArtifactStore, tmp_path: Path) -> None:
    data = b"same bytes"
    src = tmp_path / "same.txt"
    src.write_bytes(data)
    refs = {artifacts.put_bytes(data), artifacts.put_bytes(data), artifacts.put_file(src)}
    assert len(refs) == 1
    assert len(_objects(artifacts)) == 1
    artifacts.put_bytes(b"other bytes")
    assert len(_objects(artifacts)) == 2


def test_writes_leave_no_temp_files(artifacts: ArtifactStore, tmp_path: Path) -> None:
    src = tmp_path / "f.bin"
    src.write_bytes(b"file")
    artifacts.put_bytes(b"one")
    artifacts.put_json([1])
    artifacts.put_file(src)
    assert _temps(artifacts) == []


def test_tampered_content_is_refused(artifacts: ArtifactStore, tmp_path: Path) -> None:
    ref = artifacts.put_bytes(b"the real model")
    _tamper(artifacts, ref.sha256, b"an evil model!")
    with pytest.raises(IntegrityError, match=ref.sha256[:12]):
        artifacts.get_bytes(ref.sha256)
    dest = tmp_path / "out" / "model.bin"
    with pytest.raises(IntegrityError, match="tampered"):
        artifacts.get_file(ref.sha256, dest)
    assert list(dest.parent.iterdir()) == []  # neither the file nor a partial one


def test_missing_digest_is_not_found(artifacts: ArtifactStore, tmp_path: Path) -> None:
    digest = hashlib.sha256(b"never stored").hexdigest()
    assert not artifacts.exists(digest)
    with pytest.raises(NotFound, match=digest):
        artifacts.get_bytes(digest)
    with pytest.raises(NotFound, match=digest):
        artifacts.get_file(digest, tmp_path / "x.bin")
    assert not (tmp_path / "x.bin").exists()


@pytest.mark.parametrize(
    "digest", ["../etc/passwd", "../../" + "a" * 58, "A" * 64, "ab", "g" * 64, ""]
)
def test_invalid_digest_is_not_found(artifacts: ArtifactStore, tmp_path: Path, digest: str) -> None:
    with pytest.raises(NotFound, match="invalid artifact digest"):
        artifacts.get_bytes(digest)
    with pytest.raises(NotFound, match="invalid artifact digest"):
        artifacts.get_file(digest, tmp_path / "x")
    with pytest.raises(NotFound, match="invalid artifact digest"):
        artifacts.exists(digest)


class _Exploding(io.BytesIO):
    """A file that hands out one chunk and then fails: a fake, as a disk cannot be made to
    fail midway on purpose here."""

    def read(self, size: int | None = -1) -> bytes:
        if self.tell() > 0:
            raise OSError("disk on fire")
        return super().read(size)


def _open_second_time(monkeypatch: pytest.MonkeyPatch, make: Any) -> None:
    """Patch the store's ``open``: hashing (in loopline.digest) reads the real file, the
    store's own read for the copy gets ``make(real bytes)``."""
    real_open = open

    def fake_open(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if "r" in mode:
            return make(real_open(path, mode, *args, **kwargs).read())
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(store_module, "open", fake_open, raising=False)


def test_a_write_failing_midway_leaves_nothing(
    artifacts: ArtifactStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "big.bin"
    src.write_bytes(b"x" * (store_module.CHUNK + 10))
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    _open_second_time(monkeypatch, _Exploding)
    with pytest.raises(OSError, match="disk on fire"):
        artifacts.put_file(src)
    assert not artifacts.exists(digest)
    assert _objects(artifacts) == []
    assert _temps(artifacts) == []


def test_a_source_changing_while_copied_is_not_stored(
    artifacts: ArtifactStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "growing.log"
    src.write_bytes(b"version one")
    digest = hashlib.sha256(b"version one").hexdigest()
    _open_second_time(monkeypatch, lambda _data: io.BytesIO(b"version two"))
    with pytest.raises(IntegrityError):
        artifacts.put_file(src)
    assert not artifacts.exists(digest)
    assert _objects(artifacts) == []
    assert _temps(artifacts) == []
    monkeypatch.undo()
    assert artifacts.put_file(src).sha256 == digest  # a later put is not blocked


def test_unusable_url_is_a_store_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(StoreError):
        ArtifactStore(str(tmp_path / "file" / "artifacts"))
    with pytest.raises(StoreError, match="unsupported"):
        ArtifactStore("nosuchprotocol://bucket/x")

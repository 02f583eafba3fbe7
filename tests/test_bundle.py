"""The model bundle format: deterministic writing, safe extraction, verification, decoding."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from loopline.bundle import (
    MANIFEST,
    PreprocessSpec,
    decode_image,
    extract_bundle,
    load_bundle,
    to_input,
    verify_bundle_dir,
    write_bundle,
)
from loopline.errors import IntegrityError, InvalidInput

SPEC = PreprocessSpec(height=24, width=40)


def _files() -> dict[str, bytes]:
    return {
        "model.onnx": b"\x08\x07fake-onnx-graph",
        "labels.json": json.dumps(["car", "van"]).encode(),
        "preprocess.json": json.dumps(SPEC.to_dict()).encode(),
        "metadata.json": json.dumps({"run_id": "r1"}).encode(),
        "loopline/__init__.py": b"# serving code\n",
    }


def _image_bytes(fmt: str, size: tuple[int, int] = (50, 30), mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(0)
    channels = {"RGB": 3, "RGBA": 4}.get(mode)
    shape = (size[1], size[0], channels) if channels else (size[1], size[0])
    img = Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8))  # mode from the shape
    assert img.mode == mode
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _tar_with(tmp_path: Path, add: Callable[[tarfile.TarFile], None]) -> Path:
    """A tar holding a valid bundle plus whatever ``add(tar)`` puts in it."""
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in _files().items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        add(tar)
    return path


def test_write_bundle_is_deterministic(tmp_path: Path) -> None:
    a = write_bundle(_files(), tmp_path / "a.tar")
    b = write_bundle(dict(reversed(list(_files().items()))), tmp_path / "b.tar")
    assert a == b
    assert a == hashlib.sha256((tmp_path / "a.tar").read_bytes()).hexdigest()
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    changed = {**_files(), "metadata.json": b"{}"}
    assert write_bundle(changed, tmp_path / "c.tar") != a
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar", "b.tar", "c.tar"]


def test_write_bundle_needs_the_required_files(tmp_path: Path) -> None:
    files = _files()
    del files["labels.json"]
    with pytest.raises(ValueError, match="labels.json"):
        write_bundle(files, tmp_path / "x.tar")
    assert not (tmp_path / "x.tar").exists()


def test_extract_and_verify(tmp_path: Path) -> None:
    write_bundle(_files(), tmp_path / "b.tar")
    dest = extract_bundle(tmp_path / "b.tar", tmp_path / "out")
    manifest = verify_bundle_dir(dest)
    assert set(manifest) == set(_files())
    assert (dest / "loopline" / "__init__.py").read_bytes() == b"# serving code\n"
    bundle = load_bundle(dest)
    assert bundle.labels == ["car", "van"]
    assert bundle.preprocess == SPEC
    assert bundle.metadata == {"run_id": "r1"}
    assert bundle.model_path == dest / "model.onnx"
    assert extract_bundle(tmp_path / "b.tar", dest) == dest  # already there: verified only
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_tampered_file_is_refused_by_name(tmp_path: Path) -> None:
    write_bundle(_files(), tmp_path / "b.tar")
    dest = extract_bundle(tmp_path / "b.tar", tmp_path / "out")
    (dest / "labels.json").write_text(json.dumps(["truck", "van"]))
    with pytest.raises(IntegrityError, match="labels.json"):
        verify_bundle_dir(dest)
    with pytest.raises(IntegrityError, match="labels.json"):
        load_bundle(dest)
    with pytest.raises(IntegrityError, match="labels.json"):
        extract_bundle(tmp_path / "b.tar", dest)


def test_a_missing_file_or_manifest_is_refused(tmp_path: Path) -> None:
    write_bundle(_files(), tmp_path / "b.tar")
    dest = extract_bundle(tmp_path / "b.tar", tmp_path / "out")
    (dest / "model.onnx").unlink()
    with pytest.raises(IntegrityError, match="model.onnx"):
        verify_bundle_dir(dest)
    (dest / MANIFEST).unlink()
    with pytest.raises(IntegrityError, match=MANIFEST):
        verify_bundle_dir(dest)


def test_a_member_escaping_the_folder_is_refused(tmp_path: Path) -> None:
    def add(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo("../evil")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))

    with pytest.raises(IntegrityError, match=r"\.\./evil"):
        extract_bundle(_tar_with(tmp_path, add), tmp_path / "out" / "bundle")
    assert not (tmp_path / "out" / "evil").exists()
    assert not (tmp_path / "evil").exists()
    assert list((tmp_path / "out").iterdir()) == []  # no bundle, no partial folder


def test_an_absolute_member_is_refused(tmp_path: Path) -> None:
    def add(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(str(tmp_path / "abs-evil"))
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))

    with pytest.raises(IntegrityError, match="not a plain relative file"):
        extract_bundle(_tar_with(tmp_path, add), tmp_path / "out")
    assert not (tmp_path / "abs-evil").exists()


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE])
def test_a_link_member_is_refused(tmp_path: Path, kind: bytes) -> None:
    def add(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo("passwd")
        info.type = kind
        info.linkname = "/etc/passwd" if kind == tarfile.SYMTYPE else "model.onnx"
        tar.addfile(info)

    with pytest.raises(IntegrityError, match="passwd"):
        extract_bundle(_tar_with(tmp_path, add), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_corrupt_archive_is_an_integrity_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"this is not a tar archive" * 40)
    with pytest.raises(IntegrityError, match="not a valid archive"):
        extract_bundle(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("data", [b"", b"garbage bytes", _image_bytes("PNG")[:60]])
def test_decode_image_refuses_garbage(data: bytes) -> None:
    with pytest.raises(InvalidInput, match="cannot decode image"):
        decode_image(data, SPEC)


@pytest.mark.parametrize(
    ("fmt", "mode", "size"),
    [
        ("PNG", "RGB", (50, 30)),
        ("PNG", "RGBA", (20, 80)),
        ("PNG", "L", (40, 24)),
        ("JPEG", "RGB", (200, 150)),
        ("JPEG", "L", (64, 64)),
    ],
)
def test_decode_image_gives_uint8_hw3_at_spec_size(
    fmt: str, mode: str, size: tuple[int, int]
) -> None:
    out = decode_image(_image_bytes(fmt, size, mode), SPEC)
    assert out.dtype == np.uint8
    assert out.shape == (SPEC.height, SPEC.width, 3)
    batch = to_input(out[None])
    assert batch.shape == (1, 3, SPEC.height, SPEC.width) and batch.dtype == np.float32


def test_decode_image_keeps_pixels_at_native_size() -> None:
    pixels = np.random.default_rng(1).integers(0, 255, (24, 40, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    np.testing.assert_array_equal(decode_image(buf.getvalue(), SPEC), pixels)

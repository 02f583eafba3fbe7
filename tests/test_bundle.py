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


def test_a_multi_picture_jpeg_decodes_as_its_first_picture_does() -> None:
    # Cameras and phones write MPO files: JPEGs holding several pictures. Pillow opens them
    # as "MPO"; they must take the same reduced-scale JPEG decode as a plain JPEG.
    first = Image.open(io.BytesIO(_image_bytes("PNG", (640, 480)))).convert("RGB")
    second = first.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    mpo, jpeg = io.BytesIO(), io.BytesIO()
    first.save(mpo, "MPO", save_all=True, append_images=[second], quality=90)
    first.save(jpeg, "JPEG", quality=90)
    with Image.open(io.BytesIO(mpo.getvalue()), formats=["JPEG"]) as opened:
        assert opened.format == "MPO" and getattr(opened, "n_frames", 1) == 2
    np.testing.assert_array_equal(
        decode_image(mpo.getvalue(), SPEC), decode_image(jpeg.getvalue(), SPEC)
    )


# -- nothing but the manifest's files -------------------------------------------------------
def _extracted(tmp_path: Path) -> Path:
    write_bundle(_files(), tmp_path / "b.tar")
    return extract_bundle(tmp_path / "b.tar", tmp_path / "out")


@pytest.mark.parametrize(
    "extra",
    [
        "sitecustomize.py",
        "usercustomize.py",
        "loopline/drivers/metadata/migrations/versions/0099_evil.py",
        "loopline/__pycache__/__init__.cpython-311.pyc",
    ],
)
def test_a_file_not_in_the_manifest_is_refused(tmp_path: Path, extra: str) -> None:
    dest = _extracted(tmp_path)
    target = dest / extra
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("open('/tmp/pwned', 'w')\n")
    with pytest.raises(IntegrityError, match=f"bundle file {extra} is not in its manifest"):
        load_bundle(dest)
    with pytest.raises(IntegrityError, match="not in its manifest"):
        extract_bundle(tmp_path / "b.tar", dest)  # an existing folder is verified the same way


def test_an_empty_folder_is_harmless(tmp_path: Path) -> None:
    dest = _extracted(tmp_path)
    (dest / "empty").mkdir()
    assert load_bundle(dest).labels == ["car", "van"]


@pytest.mark.parametrize("target", ["model.onnx", "/etc/passwd"])
def test_a_link_in_a_bundle_folder_is_refused(tmp_path: Path, target: str) -> None:
    dest = _extracted(tmp_path)
    (dest / "loopline" / "linked.py").symlink_to(target)
    with pytest.raises(IntegrityError, match="loopline/linked.py is a link or special file"):
        verify_bundle_dir(dest)


def test_a_listed_file_replaced_by_a_link_is_refused(tmp_path: Path) -> None:
    dest = _extracted(tmp_path)
    real = tmp_path / "labels-elsewhere.json"
    real.write_bytes((dest / "labels.json").read_bytes())  # same content, outside the folder
    (dest / "labels.json").unlink()
    (dest / "labels.json").symlink_to(real)
    with pytest.raises(IntegrityError, match="labels.json is a link"):
        verify_bundle_dir(dest)


def test_a_linked_folder_is_refused(tmp_path: Path) -> None:
    dest = _extracted(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (dest / "plugins").symlink_to(outside, target_is_directory=True)
    with pytest.raises(IntegrityError, match="plugins is a link"):
        verify_bundle_dir(dest)


def test_a_manifest_naming_an_unsafe_path_is_refused(tmp_path: Path) -> None:
    dest = _extracted(tmp_path)
    manifest = json.loads((dest / MANIFEST).read_text())
    manifest["files"]["../outside"] = "0" * 64
    (dest / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError, match="unsafe path '../outside'"):
        verify_bundle_dir(dest)


def _bundle_tar(tmp_path: Path, add: Callable[[tarfile.TarFile], None]) -> Path:
    """A tar of a complete, manifest-carrying bundle, then whatever ``add(tar)`` appends."""
    write_bundle(_files(), tmp_path / "good.tar")
    path = tmp_path / "evil.tar"
    with tarfile.open(tmp_path / "good.tar") as good, tarfile.open(path, "w") as tar:
        for member in good.getmembers():
            tar.addfile(member, good.extractfile(member))
        add(tar)
    return path


def _add_file(name: str, data: bytes) -> Callable[[tarfile.TarFile], None]:
    def add(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    return add


def test_a_tar_with_an_extra_member_is_refused(tmp_path: Path) -> None:
    tar = _bundle_tar(tmp_path, _add_file("sitecustomize.py", b"import os\n"))
    with pytest.raises(IntegrityError, match="sitecustomize.py is not in its manifest"):
        extract_bundle(tar, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("name", ["labels.json", "LABELS.json"])
def test_a_tar_naming_a_file_twice_is_refused(tmp_path: Path, name: str) -> None:
    tar = _bundle_tar(tmp_path, _add_file(name, json.dumps(["car", "van"]).encode()))
    with pytest.raises(IntegrityError, match="appears twice"):
        extract_bundle(tar, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("kind", "name"),
    [
        (tarfile.DIRTYPE, "loopline/plugins"),
        (tarfile.FIFOTYPE, "pipe"),
        (tarfile.CHRTYPE, "tty"),
        (tarfile.BLKTYPE, "disk"),
    ],
)
def test_a_tar_with_a_special_member_is_refused(tmp_path: Path, kind: bytes, name: str) -> None:
    def add(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(name)
        info.type = kind
        tar.addfile(info)

    with pytest.raises(IntegrityError, match=f"{name}' is not a plain relative file"):
        extract_bundle(_bundle_tar(tmp_path, add), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["./model2.onnx", "loopline//x.py", "a/../b.py"])
def test_a_tar_member_with_an_unnormalised_name_is_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(IntegrityError, match="not a plain relative file"):
        extract_bundle(_bundle_tar(tmp_path, _add_file(name, b"x")), tmp_path / "out")


def test_an_existing_folder_must_be_an_extraction_of_this_tar(tmp_path: Path) -> None:
    dest = _extracted(tmp_path)
    other = write_bundle({**_files(), "labels.json": b'["bus"]'}, tmp_path / "other.tar")
    assert other
    with pytest.raises(IntegrityError, match="manifest differs"):
        extract_bundle(tmp_path / "other.tar", dest)


@pytest.mark.parametrize("same", [True, False])
def test_a_folder_extracted_by_another_process_meanwhile_must_be_this_tar(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, same: bool
) -> None:
    import loopline.bundle

    mine = tmp_path / "mine.tar"
    write_bundle(_files(), mine)
    theirs = tmp_path / "theirs.tar"
    write_bundle(_files() if same else {**_files(), "labels.json": b'["bus"]'}, theirs)
    staged = extract_bundle(theirs, tmp_path / "staged")
    dest = tmp_path / "out"
    extract_members = loopline.bundle._extract_members

    def racing(tar: tarfile.TarFile, into: Path) -> None:
        extract_members(tar, into)
        staged.rename(dest)  # another process finishes first, with its own tar

    monkeypatch.setattr(loopline.bundle, "_extract_members", racing)
    if same:
        assert extract_bundle(mine, dest) == dest
    else:  # a self-consistent bundle, but not this one
        with pytest.raises(IntegrityError, match="manifest differs"):
            extract_bundle(mine, dest)
    assert json.loads((dest / "labels.json").read_bytes()) == (["car", "van"] if same else ["bus"])
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")] == []


# -- deterministic writing ---------------------------------------------------------------------
def test_write_bundle_fixes_every_header_field(tmp_path: Path) -> None:
    write_bundle(_files(), tmp_path / "a.tar")
    with tarfile.open(tmp_path / "a.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == sorted([*_files(), MANIFEST])
    for m in members:
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644)
        assert m.isreg()


def test_write_bundle_gives_the_same_bytes_in_another_process(tmp_path: Path) -> None:
    """Same files, different clock zone, umask, working folder and dict order: same tar."""
    import os
    import subprocess
    import sys

    here = write_bundle(_files(), tmp_path / "here.tar")
    files = {k: v.decode() for k, v in reversed(list(_files().items()))}
    code = (
        "import json, os, sys, time; from pathlib import Path; "
        "from loopline.bundle import write_bundle; time.sleep(1.1); os.umask(0o077); "
        "files = {k: v.encode() for k, v in json.loads(sys.argv[1]).items()}; "
        "print(write_bundle(files, Path(sys.argv[2])))"
    )
    env = {**os.environ, "TZ": "Pacific/Kiritimati"}
    sub = tmp_path / "sub"
    sub.mkdir()
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(files), str(tmp_path / "there.tar")],
        capture_output=True, text=True, check=True, env=env, cwd=sub,
    )  # fmt: skip
    assert out.stdout.strip() == here
    assert (tmp_path / "there.tar").read_bytes() == (tmp_path / "here.tar").read_bytes()


@pytest.mark.parametrize("name", [MANIFEST, "../x", "/abs", "a//b", ""])
def test_write_bundle_refuses_unsafe_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="cannot be a bundle file name"):
        write_bundle({**_files(), name: b"x"}, tmp_path / "x.tar")


# -- fetching from the artifact store --------------------------------------------------------------
def _stored(tmp_path: Path) -> tuple[object, str, Path]:
    from loopline.drivers.artifacts import ArtifactStore

    artifacts = ArtifactStore(str(tmp_path / "artifacts"))
    digest = write_bundle(_files(), tmp_path / "b.tar")
    ref = artifacts.put_file(tmp_path / "b.tar")
    stored = next((tmp_path / "artifacts" / "sha256").rglob(digest))
    return artifacts, ref.sha256, stored


def _flip(path: Path) -> None:
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same length: only the hash can tell
    path.write_bytes(bytes(data))


def test_fetch_bundle_rechecks_the_store_even_with_a_cached_extraction(tmp_path: Path) -> None:
    from loopline.bundle import fetch_bundle

    artifacts, digest, stored = _stored(tmp_path)
    cache = tmp_path / "cache"
    assert fetch_bundle(artifacts, digest, cache).labels == ["car", "van"]
    assert (cache / digest).is_dir()  # an extraction stays for the next call
    _flip(stored)
    with pytest.raises(IntegrityError, match="corrupt or tampered"):
        fetch_bundle(artifacts, digest, cache)
    assert [p.name for p in cache.iterdir()] == [digest]  # no stray temporary tar


def test_fetch_bundle_replaces_a_tampered_extraction(tmp_path: Path) -> None:
    """A cached folder rewritten consistently (file and manifest) is not trusted."""
    from loopline.bundle import fetch_bundle

    artifacts, digest, _ = _stored(tmp_path)
    cache = tmp_path / "cache"
    folder = fetch_bundle(artifacts, digest, cache).path
    evil = json.dumps(["truck", "bus"]).encode()
    (folder / "labels.json").write_bytes(evil)
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"]["labels.json"] = hashlib.sha256(evil).hexdigest()
    (folder / "sitecustomize.py").write_text("import os\n")
    manifest["files"]["sitecustomize.py"] = hashlib.sha256(b"import os\n").hexdigest()
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    assert verify_bundle_dir(folder)  # consistent in itself
    bundle = fetch_bundle(artifacts, digest, cache)
    assert bundle.labels == ["car", "van"]
    assert not (bundle.path / "sitecustomize.py").exists()
    assert sorted(p.name for p in cache.iterdir()) == [digest]

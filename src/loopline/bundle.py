"""The model bundle: the one file format shared by Build (writes it) and Deploy (serves it).

A bundle is a deterministic tar archive holding::

    model.onnx          self-contained ONNX model, input float32 [N, 3, H, W] pixels 0..255
                        (normalisation is inside the graph), output float32 logits [N, C]
    labels.json         class names in output order
    preprocess.json     how to turn an image into the input tensor (see ``PreprocessSpec``)
    metadata.json       lineage and metrics of the build that produced it
    monitoring.json     (optional) what Monitor compares production with: validation
                        accuracy, calibration, reference distributions
    Dockerfile, requirements-serve.txt, loopline/   build context of a torch-free serving image
    MANIFEST.json       sha256 of every other file

Nothing here imports torch: the serving path reads bundles with numpy, Pillow and ONNX Runtime.
Every bundle is verified against its manifest before it is used, and a bundle folder may hold
nothing the manifest does not list (an extra ``sitecustomize.py`` would run in the image).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import stat
import tarfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from loopline.digest import sha256_bytes, sha256_file
from loopline.errors import IntegrityError, InvalidInput
from loopline.images import open_image

FORMAT = "loopline-bundle/1"
MANIFEST = "MANIFEST.json"
REQUIRED = ("model.onnx", "labels.json", "preprocess.json", "metadata.json")


@dataclass(frozen=True)
class PreprocessSpec:
    """Image to tensor: decode, convert to RGB, resize to (height, width), NCHW float32 0..255."""

    height: int
    width: int
    color: str = "RGB"
    resize: str = "bilinear"
    layout: str = "NCHW"
    input_name: str = "input"
    output_name: str = "logits"

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessSpec:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


_RESAMPLE = {"bilinear": 2, "nearest": 0, "bicubic": 3}  # PIL.Image.Resampling values
# Pillow opens a JPEG holding several pictures (phones' and cameras' MPO files) as "MPO".
_JPEG_LIKE = frozenset({"JPEG", "MPO"})


def decode_image(data: bytes, spec: PreprocessSpec, *, max_pixels: int | None = None) -> np.ndarray:
    """Decode JPEG/PNG bytes into a uint8 array [H, W, 3] at the spec's size.

    Only JPEG and PNG are opened (UnsupportedImage otherwise); an image whose header
    declares more than ``max_pixels`` pixels is refused before decoding (ImageTooLarge).
    Raises InvalidInput for anything Pillow cannot decode. Training and serving both use
    this function, so a model sees the same pixels in production as in training.
    """
    try:
        with open_image(data, max_pixels=max_pixels) as img:
            if img.format in _JPEG_LIKE:  # decode at a reduced scale when that is enough
                img.draft("RGB", (spec.width, spec.height))
            rgb = img.convert(spec.color)
            if rgb.size != (spec.width, spec.height):
                rgb = rgb.resize((spec.width, spec.height), _RESAMPLE[spec.resize])
            return np.asarray(rgb, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as err:
        raise InvalidInput(f"cannot decode image: {err}") from None


def to_input(images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 3] to the model's float32 [N, 3, H, W] input."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32)


# -- writing ------------------------------------------------------------------------------
def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    # Every field that tarfile would otherwise take from the clock or the user is fixed,
    # so the same files always give the same bytes (and the same digest).
    info = tarfile.TarInfo(name)
    info.size = size
    info.type = tarfile.REGTYPE
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def write_bundle(files: dict[str, bytes], out: Path) -> str:
    """Write ``files`` plus a manifest as a deterministic tar; return the tar's sha256.

    The same files give a byte-identical archive whatever their order, the clock, the user
    or the umask. The archive appears under ``out`` only when complete.
    """
    missing = [name for name in REQUIRED if name not in files]
    if missing:
        raise ValueError(f"bundle is missing {', '.join(missing)}")
    for name in files:
        if name == MANIFEST or _unsafe(name):
            raise ValueError(f"{name!r} cannot be a bundle file name")
    manifest = {
        "format": FORMAT,
        "files": {name: sha256_bytes(data) for name, data in sorted(files.items())},
    }
    everything = dict(files)
    everything[MANIFEST] = json.dumps(manifest, indent=2, sort_keys=True).encode()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex}.part")
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            for name in sorted(everything):
                data = everything[name]
                tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return sha256_file(out)


# -- reading ------------------------------------------------------------------------------
def _unsafe(name: str) -> bool:
    """True unless ``name`` is a plain, normalised, relative POSIX path inside the bundle."""
    p = PurePosixPath(name)
    return (
        not name
        or "\\" in name
        or "\0" in name
        or p.is_absolute()
        or p.as_posix() != name
        or any(part in ("", ".", "..") for part in name.split("/"))
    )


def extract_bundle(tar_path: Path, dest: Path) -> Path:
    """Extract a bundle tar into ``dest`` (atomically) and verify it.

    Only regular files with safe relative paths, each named once, are accepted: a link,
    folder, device, absolute or ``..`` path, duplicate, or any file the manifest does not
    list fails the whole extraction and leaves nothing behind. If ``dest`` already exists
    it is verified against this tar's manifest instead (an earlier extraction of it).
    """
    try:
        if dest.exists():
            with tarfile.open(tar_path, "r:*") as tar:
                verify_bundle_dir(dest, manifest=_manifest_bytes(tar, tar_path))
            return dest
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.part")
        tmp.mkdir(parents=True)
        try:
            with tarfile.open(tar_path, "r:*") as tar:
                _extract_members(tar, tmp)
            verify_bundle_dir(tmp)
            try:
                os.replace(tmp, dest)
            except OSError:  # another process extracted first: it must be this very tar
                if not dest.exists():
                    raise
                verify_bundle_dir(dest, manifest=(tmp / MANIFEST).read_bytes())
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    except tarfile.TarError as err:
        raise IntegrityError(f"bundle {tar_path} is not a valid archive: {err}") from None
    return dest


def _extract_members(tar: tarfile.TarFile, into: Path) -> None:
    seen: set[str] = set()
    for member in tar:
        name = member.name
        if not member.isreg() or _unsafe(name):
            raise IntegrityError(
                f"bundle member {name!r} is not a plain relative file; refusing the bundle"
            )
        # Case-folded, so two names cannot land on one file of a case-insensitive disk.
        if name.casefold() in seen:
            raise IntegrityError(f"bundle member {name!r} appears twice; refusing the bundle")
        seen.add(name.casefold())
        target = into.joinpath(*name.split("/"))
        target.parent.mkdir(parents=True, exist_ok=True)
        src = tar.extractfile(member)
        assert src is not None  # a regular member always has content
        with src, open(target, "xb") as out:
            shutil.copyfileobj(src, out)


def _manifest_bytes(tar: tarfile.TarFile, tar_path: Path) -> bytes:
    try:
        src = tar.extractfile(MANIFEST)
    except KeyError:
        src = None
    if src is None:
        raise IntegrityError(f"bundle {tar_path} has no {MANIFEST}; not a Loopline bundle")
    with src:
        return src.read()


def verify_bundle_dir(path: Path, manifest: bytes | None = None) -> dict[str, str]:
    """Check an extracted bundle against its MANIFEST.json; return the manifest's files.

    The folder must hold exactly the files the manifest lists (plus the manifest), each
    matching its sha256, and no links or special files: anything else, such as a
    ``sitecustomize.py`` dropped into the folder, would run in the serving image. With
    ``manifest`` (the bytes of a trusted MANIFEST.json) the folder's own manifest must
    also equal it.
    """
    manifest_path = path / MANIFEST
    if manifest_path.is_symlink() or not manifest_path.is_file():
        raise IntegrityError(f"{path} has no {MANIFEST}; not a Loopline bundle")
    raw = manifest_path.read_bytes()
    if manifest is not None and raw != manifest:
        raise IntegrityError(f"{path} is not an extraction of this bundle (its manifest differs)")
    files = _parse_manifest(raw, manifest_path)
    _check_listing(path, files)
    for name, digest in files.items():
        if sha256_file(path.joinpath(*name.split("/"))) != digest:
            raise IntegrityError(
                f"bundle file {name} does not match its sha256 in the manifest "
                f"(tampered or corrupt); refusing to serve {path}"
            )
    missing = [name for name in REQUIRED if name not in files]
    if missing:
        raise IntegrityError(f"bundle at {path} lacks {', '.join(missing)}")
    return files


def _parse_manifest(raw: bytes, where: Path) -> dict[str, str]:
    try:
        data = json.loads(raw)
        files = data["files"]
        fmt = data["format"]
    except (ValueError, KeyError, TypeError) as err:
        raise IntegrityError(f"{where} is unreadable: {err}") from None
    if fmt != FORMAT:
        raise IntegrityError(f"{where}: unsupported bundle format {fmt!r}; expected {FORMAT}")
    if not isinstance(files, dict):
        raise IntegrityError(f"{where} is unreadable: 'files' is not a mapping")
    for name, digest in files.items():
        if _unsafe(name) or name == MANIFEST:
            raise IntegrityError(f"bundle manifest names an unsafe path {name!r}")
        if not isinstance(digest, str) or len(digest) != 64:
            raise IntegrityError(f"bundle manifest gives {name} an invalid sha256")
    return dict(files)


def _check_listing(path: Path, files: dict[str, str]) -> None:
    """Every entry under ``path`` is a folder or a regular file the manifest lists."""
    expected = set(files) | {MANIFEST}
    found: set[str] = set()
    for folder, dirs, names in os.walk(path):
        for name in sorted(dirs) + sorted(names):
            full = os.path.join(folder, name)
            rel = Path(full).relative_to(path).as_posix()
            mode = os.lstat(full).st_mode
            if stat.S_ISDIR(mode):
                continue
            if not stat.S_ISREG(mode):
                raise IntegrityError(
                    f"bundle entry {rel} is a link or special file; refusing to serve {path}"
                )
            if rel not in expected:
                raise IntegrityError(
                    f"bundle file {rel} is not in its manifest; refusing to serve {path}"
                )
            found.add(rel)
    missing = sorted(expected - found)
    if missing:
        raise IntegrityError(f"bundle file {missing[0]} is missing from {path}")


@dataclass
class Bundle:
    """A verified, extracted bundle."""

    path: Path
    labels: list[str]
    preprocess: PreprocessSpec
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def model_path(self) -> Path:
        return self.path / "model.onnx"


def load_bundle(path: Path) -> Bundle:
    """Verify and read an extracted bundle directory."""
    verify_bundle_dir(path)
    return Bundle(
        path=path,
        labels=json.loads((path / "labels.json").read_text()),
        preprocess=PreprocessSpec.from_dict(json.loads((path / "preprocess.json").read_text())),
        metadata=json.loads((path / "metadata.json").read_text()),
    )


def fetch_bundle(artifacts: Any, digest: str, cache_dir: Path) -> Bundle:
    """Fetch the bundle stored as ``digest``, verify it and load it.

    The tar is read from the artifact store and checked against ``digest`` on every call.
    An extraction left in ``cache_dir`` by an earlier call is used only when it holds
    exactly the files of that verified tar; otherwise it is replaced.
    """
    _check_digest(digest)
    cache_dir.mkdir(parents=True, exist_ok=True)
    dest = cache_dir / digest
    tar_path = artifacts.get_file(digest, cache_dir / f".{digest}.{uuid.uuid4().hex}.tar")
    try:
        try:
            extract_bundle(tar_path, dest)
        except IntegrityError:
            if not dest.exists():
                raise
            # A tampered or partial earlier extraction: move it aside, extract afresh.
            stale = cache_dir / f".{digest}.{uuid.uuid4().hex}.stale"
            with contextlib.suppress(FileNotFoundError):
                os.replace(dest, stale)
            shutil.rmtree(stale, ignore_errors=True)
            extract_bundle(tar_path, dest)
    finally:
        tar_path.unlink(missing_ok=True)
    return load_bundle(dest)


def _check_digest(digest: str) -> None:
    if len(digest) != 64 or not set(digest) <= set("0123456789abcdef"):
        raise IntegrityError(f"invalid bundle digest {digest!r}: expected 64 lowercase hex")

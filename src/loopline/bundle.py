"""The model bundle: the one file format shared by Build (writes it) and Deploy (serves it).

A bundle is a deterministic tar archive holding::

    model.onnx          self-contained ONNX model, input float32 [N, 3, H, W] pixels 0..255
                        (normalisation is inside the graph), output float32 logits [N, C]
    labels.json         class names in output order
    preprocess.json     how to turn an image into the input tensor (see ``PreprocessSpec``)
    metadata.json       lineage and metrics of the build that produced it
    Dockerfile, requirements-serve.txt, loopline/   build context of a torch-free serving image
    MANIFEST.json       sha256 of every other file

Nothing here imports torch: the serving path reads bundles with numpy, Pillow and ONNX Runtime.
Every bundle is verified against its manifest before it is used.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from loopline.errors import IntegrityError, InvalidInput

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


def decode_image(data: bytes, spec: PreprocessSpec) -> np.ndarray:
    """Decode JPEG/PNG bytes into a uint8 array [H, W, 3] at the spec's size.

    Raises InvalidInput for anything Pillow cannot decode. Training and serving both use
    this function, so a model sees the same pixels in production as in training.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format == "JPEG":
                img.draft("RGB", (spec.width, spec.height))
            rgb = img.convert(spec.color)
            if rgb.size != (spec.width, spec.height):
                rgb = rgb.resize((spec.width, spec.height), _RESAMPLE[spec.resize])
            return np.asarray(rgb, dtype=np.uint8)
    except UnidentifiedImageError:
        raise InvalidInput("cannot decode image: not a JPEG or PNG file") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise InvalidInput(f"cannot decode image: {err}") from None


def to_input(images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 3] to the model's float32 [N, 3, H, W] input."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32)


# -- writing ------------------------------------------------------------------------------
def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uname = info.gname = ""
    return info


def write_bundle(files: dict[str, bytes], out: Path) -> str:
    """Write ``files`` plus a manifest as a deterministic tar; return the tar's sha256.

    The archive appears under ``out`` only when complete.
    """
    missing = [name for name in REQUIRED if name not in files]
    if missing:
        raise ValueError(f"bundle is missing {', '.join(missing)}")
    manifest = {
        "format": "loopline-bundle/1",
        "files": {name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())},
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
    h = hashlib.sha256(out.read_bytes())
    return h.hexdigest()


# -- reading ------------------------------------------------------------------------------
def extract_bundle(tar_path: Path, dest: Path) -> Path:
    """Extract a bundle tar into ``dest`` (atomically) and verify it.

    Only regular files with relative paths are accepted: a member that would escape
    ``dest`` (absolute, ``..``, links, devices) fails the whole extraction.
    """
    if dest.exists():
        verify_bundle_dir(dest)
        return dest
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.part")
    tmp.mkdir(parents=True)
    try:
        with tarfile.open(tar_path, "r:*") as tar:
            for member in tar.getmembers():
                p = PurePosixPath(member.name)
                if member.isdir():
                    continue
                if not member.isreg() or p.is_absolute() or ".." in p.parts:
                    raise IntegrityError(
                        f"bundle member {member.name!r} is not a plain relative file; refusing it"
                    )
                target = tmp.joinpath(*p.parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(member)
                assert src is not None
                with src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out)
        verify_bundle_dir(tmp)
        try:
            os.replace(tmp, dest)
        except OSError:  # another process extracted it first
            if not dest.exists():
                raise
    except tarfile.TarError as err:
        raise IntegrityError(f"bundle {tar_path} is not a valid archive: {err}") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def verify_bundle_dir(path: Path) -> dict[str, str]:
    """Check every file of an extracted bundle against MANIFEST.json; return the manifest."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise IntegrityError(f"{path} has no {MANIFEST}; not a Loopline bundle")
    try:
        files: dict[str, str] = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError) as err:
        raise IntegrityError(f"{manifest_path} is unreadable: {err}") from None
    for name, digest in files.items():
        p = PurePosixPath(name)
        if p.is_absolute() or ".." in p.parts:
            raise IntegrityError(f"bundle manifest names an unsafe path {name!r}")
        f = path.joinpath(*p.parts)
        if not f.is_file():
            raise IntegrityError(f"bundle file {name} is missing from {path}")
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
        if h.hexdigest() != digest:
            raise IntegrityError(
                f"bundle file {name} does not match its sha256 in the manifest "
                f"(tampered or corrupt); refusing to serve {path}"
            )
    missing = [name for name in REQUIRED if name not in files]
    if missing:
        raise IntegrityError(f"bundle at {path} lacks {', '.join(missing)}")
    return files


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
    """Fetch a bundle from the artifact store (sha256-verified), extract and load it."""
    dest = cache_dir / digest
    if not dest.exists():
        tar_path = artifacts.get_file(digest, cache_dir / f"{digest}.tar")
        try:
            extract_bundle(tar_path, dest)
        finally:
            tar_path.unlink(missing_ok=True)
    return load_bundle(dest)

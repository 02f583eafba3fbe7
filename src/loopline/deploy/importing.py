"""Import a model trained elsewhere: an ONNX file becomes a verified, registered bundle.

The model is checked with ONNX Runtime (no torch, no ``onnx`` package): one float32 input
``[N, 3, H, W]`` and one float32 output ``[N, C]`` with one class per label, a batch axis
that is not fixed, and a trial run on a batch of two. The bundle holds the same files as
one the package step writes (model, labels, preprocessing, metadata, the serving image's
build context, the manifest); it is stored by content and registered like a build's, with
its lineage marked as imported and no metrics. The bundle's bytes depend only on the model,
labels, input size and name, so importing the same file again registers nothing new.

Like every bundle's, the model takes RGB pixels 0..255: normalisation, if it needs any,
must be inside its graph.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from loopline import __version__
from loopline.bundle import PreprocessSpec, write_bundle
from loopline.digest import sha256_bytes
from loopline.errors import ConfigError, InvalidInput, LooplineError

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class ImportedModel:
    """What ``import_onnx`` did: the version registered (or found equal), and the digests."""

    name: str
    version: int
    created: bool
    bundle_sha256: str
    onnx_sha256: str
    input_size: tuple[int, int]
    labels: list[str]

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["input_size"] = list(self.input_size)
        return out


def parse_labels(text: str) -> list[str]:
    """``a,b,c`` to ``["a", "b", "c"]``: at least two, distinct, none empty."""
    labels = [part.strip() for part in text.split(",")]
    if len(labels) < 2 or any(not label for label in labels):
        raise ConfigError(f"--labels {text!r}: give two or more class names, e.g. car,van,truck")
    dupes = sorted({label for label in labels if labels.count(label) > 1})
    if dupes:
        raise ConfigError(f"--labels names {', '.join(dupes)} more than once")
    return labels


def parse_input_size(text: str) -> tuple[int, int]:
    """``H,W`` (or one number for a square) to ``(H, W)``."""
    parts = [p.strip() for p in text.replace("x", ",").split(",")]
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or not all(p.isdigit() and 0 < int(p) <= 8192 for p in parts):
        raise ConfigError(f"--input-size {text!r}: give H,W in pixels, e.g. 64,64")
    return int(parts[0]), int(parts[1])


@dataclass(frozen=True)
class Signature:
    input_name: str
    output_name: str
    height: int
    width: int


def inspect_onnx(
    model: bytes, path: Path, labels: list[str], input_size: tuple[int, int] | None = None
) -> Signature:
    """Check that ONNX Runtime runs ``model`` (the bytes of ``path``) as a Loopline image
    classifier for ``labels``, from those bytes alone (the bundle holds no other file).

    Raises InvalidInput naming what is wrong and what is expected; ConfigError when the
    model's input size is not fixed and ``input_size`` is not given, or disagrees with it.
    """
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    except Exception as err:  # ORT raises its own exception types
        raise InvalidInput(
            f"ONNX Runtime cannot load {path} as one self-contained ONNX file: {_first(err)}"
        ) from None
    inputs, outputs = session.get_inputs(), session.get_outputs()
    want = "one input float32 [N, 3, H, W] and one output float32 [N, classes]"
    if len(inputs) != 1 or len(outputs) != 1:
        raise InvalidInput(
            f"{path.name} has {len(inputs)} input(s) ({', '.join(i.name for i in inputs)}) and "
            f"{len(outputs)} output(s) ({', '.join(o.name for o in outputs)}); expected {want}"
        )
    inp, out = inputs[0], outputs[0]
    if inp.type != "tensor(float)" or len(inp.shape) != 4:
        raise InvalidInput(
            f"{path.name}: input {inp.name!r} is {inp.type} {inp.shape}; expected {want}"
        )
    if out.type != "tensor(float)" or len(out.shape) != 2:
        raise InvalidInput(
            f"{path.name}: output {out.name!r} is {out.type} {out.shape}; expected {want}"
        )
    batch, channels, height, width = inp.shape
    if isinstance(batch, int) or isinstance(out.shape[0], int):
        raise InvalidInput(
            f"{path.name}: the batch axis is fixed ({inp.shape} to {out.shape}); Loopline "
            "batches images, so export the model with a dynamic batch axis"
        )
    if isinstance(channels, int) and channels != 3:
        raise InvalidInput(
            f"{path.name}: input {inp.name!r} takes {channels} channels; expected 3 (RGB)"
        )
    n_out = out.shape[1]
    if isinstance(n_out, int) and n_out != len(labels):
        raise InvalidInput(_classes_message(path, n_out, labels))
    size = _input_size(path, height, width, input_size)
    x = np.zeros((2, 3, *size), dtype=np.float32)
    try:
        (y,) = session.run([out.name], {inp.name: x})
    except Exception as err:
        raise InvalidInput(
            f"{path.name} fails on a float32 batch [2, 3, {size[0]}, {size[1]}]: {_first(err)}"
        ) from None
    if y.shape != (2, len(labels)):
        if y.ndim == 2 and y.shape[0] == 2:
            raise InvalidInput(_classes_message(path, int(y.shape[1]), labels))
        raise InvalidInput(
            f"{path.name} answers a batch of 2 with shape {list(y.shape)}; "
            f"expected [2, {len(labels)}]"
        )
    return Signature(inp.name, out.name, *size)


def _first(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _classes_message(path: Path, n_out: int, labels: list[str]) -> str:
    return (
        f"{path.name} has {n_out} outputs per image but --labels names {len(labels)} classes "
        f"({','.join(labels)}); give one label per output, in output order"
    )


def _input_size(
    path: Path, height: Any, width: Any, given: tuple[int, int] | None
) -> tuple[int, int]:
    if isinstance(height, int) and isinstance(width, int):
        if given is not None and given != (height, width):
            raise ConfigError(
                f"--input-size {given[0]},{given[1]} disagrees with {path.name}, whose input "
                f"is fixed at {height},{width}; leave --input-size out"
            )
        return height, width
    if given is None:
        raise ConfigError(
            f"{path.name} does not fix its input size ([N, 3, {height}, {width}]); "
            "give --input-size H,W"
        )
    for axis, dim, value in (("height", height, given[0]), ("width", width, given[1])):
        if isinstance(dim, int) and dim != value:
            raise ConfigError(f"--input-size {axis} {value} disagrees with {path.name} ({dim})")
    return given


def build_import_bundle(
    model: bytes, name: str, labels: list[str], signature: Signature, out: Path
) -> str:
    """Write the bundle of an imported model to ``out``; return its sha256."""
    from loopline.deploy.image import image_context_files

    spec = PreprocessSpec(
        height=signature.height,
        width=signature.width,
        input_name=signature.input_name,
        output_name=signature.output_name,
    )
    # No file name and no clock: the same model imported again gives the same bytes.
    metadata = {
        "name": name,
        "imported": True,
        "source_sha256": sha256_bytes(model),
        "metrics": {},
        "loopline_version": __version__,
    }
    files: dict[str, bytes] = {
        "model.onnx": model,
        "labels.json": json.dumps(labels).encode(),
        "preprocess.json": json.dumps(spec.to_dict(), indent=2).encode(),
        "metadata.json": json.dumps(metadata, indent=2, sort_keys=True).encode(),
    }
    files.update(image_context_files())
    return write_bundle(files, out)


def import_onnx(
    store: Any,
    artifacts: Any,
    path: str | Path,
    name: str,
    labels: list[str],
    input_size: tuple[int, int] | None = None,
    *,
    actor: str = "loopline",
) -> ImportedModel:
    """Check ``path``, bundle it, store the bundle by content and register it as ``name``.

    The new version gets the alias ``candidate``, as a build's does, and an audit event
    ``model.import``. A bundle equal to a version of ``name`` registers nothing (created
    False) and returns that version.
    """
    path = Path(path)
    if not _NAME.fullmatch(name):
        raise ConfigError(
            f"--name {name!r}: use letters, digits, '.', '_' and '-', starting with a "
            "letter or digit"
        )
    if len(set(labels)) != len(labels) or not labels:
        raise ConfigError("labels must be distinct class names")
    if not path.is_file():
        raise LooplineError(f"{path} is not a file; give the .onnx model to import")
    model = path.read_bytes()
    signature = inspect_onnx(model, path, labels, input_size)
    with tempfile.TemporaryDirectory(prefix="loopline-import-") as tmp:
        tar = Path(tmp) / "bundle.tar"
        build_import_bundle(model, name, labels, signature, tar)
        ref = artifacts.put_file(tar)
    onnx_sha = sha256_bytes(model)
    registration = store.models.register(
        name,
        bundle_uri=ref.uri,
        bundle_sha256=ref.sha256,
        metrics={},
        lineage={
            "imported": True,
            "source_file": path.name,
            "sha256": onnx_sha,
            "loopline_version": __version__,
            "input_size": [signature.height, signature.width],
        },
        actor=actor,
    )
    mv = registration.version
    if registration.created:
        store.audit.record(
            actor,
            "model.import",
            f"{mv.name}:{mv.version}",
            source_file=path.name,
            sha256=onnx_sha,
            bundle_sha256=ref.sha256,
        )
    return ImportedModel(
        mv.name,
        mv.version,
        registration.created,
        ref.sha256,
        onnx_sha,
        (signature.height, signature.width),
        list(labels),
    )

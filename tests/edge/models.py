"""Tiny, real ONNX bundles for the edge tests, made with onnx.helper (no torch, no training).

Each model is a Flatten and a Gemm over an 8x8 input whose weights are zero, so its bias
alone decides the answer: version 1 answers ``car``, version 2 ``van``, and a client can
tell from any answer which version gave it. ``tampered_bundle`` writes a bundle whose
manifest no longer matches its model (the file was changed after the manifest was made).
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np

LABELS = ["car", "van", "truck"]
SIZE = 8


def constant_onnx(label: str, size: int = SIZE) -> bytes:
    """ONNX model: input float32 [N, 3, size, size] -> logits [N, len(LABELS)], top ``label``."""
    from onnx import TensorProto, helper, numpy_helper

    weights = np.zeros((3 * size * size, len(LABELS)), dtype=np.float32)
    bias = np.zeros(len(LABELS), dtype=np.float32)
    bias[LABELS.index(label)] = 5.0
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["input"], ["flat"], axis=1),
            helper.make_node("Gemm", ["flat", "W", "b"], ["logits"]),
        ],
        "constant",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", len(LABELS)])],
        initializer=[numpy_helper.from_array(weights, "W"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def bundle_files(label: str, name: str = "m") -> dict[str, bytes]:
    from loopline.bundle import PreprocessSpec

    return {
        "model.onnx": constant_onnx(label),
        "labels.json": json.dumps(LABELS).encode(),
        "preprocess.json": json.dumps(PreprocessSpec(height=SIZE, width=SIZE).to_dict()).encode(),
        "metadata.json": json.dumps({"name": name, "answers": label}).encode(),
    }


def write_model_bundle(label: str, out: Path) -> str:
    from loopline.bundle import write_bundle

    return write_bundle(bundle_files(label), out)


def tampered_bundle(out: Path) -> None:
    """A well-formed tar whose model.onnx differs from what its MANIFEST.json lists."""
    from loopline.bundle import MANIFEST, write_bundle

    honest = out.with_suffix(".honest.tar")
    write_bundle(bundle_files("truck"), honest)
    with tarfile.open(honest) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar}  # type: ignore[union-attr]
    members["model.onnx"] = constant_onnx("car")  # swapped after the manifest was made
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(members):
            info = tarfile.TarInfo(name)
            info.size = len(members[name])
            tar.addfile(info, io.BytesIO(members[name]))
    assert MANIFEST in members
    honest.unlink()


def png(seed: int, size: tuple[int, int] = (20, 16)) -> bytes:
    """A small random PNG."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()

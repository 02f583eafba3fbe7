"""Package: export to ONNX, prove ONNX Runtime matches torch, write the model bundle.

The bundle (see ``loopline.bundle``) holds the self-contained ONNX model, labels,
preprocessing spec, metadata, the monitoring reference (``monitoring.json``, see
``builder.monitoring``), the build context of a torch-free serving image, and a sha256
manifest. It is stored in the artifact store by content.
"""

from __future__ import annotations

import json
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from loopline import __version__
from loopline.builder.images import load_images
from loopline.builder.monitoring import monitoring_file
from loopline.bundle import PreprocessSpec, to_input, write_bundle
from loopline.config import PackageConfig
from loopline.digest import sha256_bytes
from loopline.errors import PipelineError, require_extra
from loopline.pipeline import StepContext


class PackageParams(PackageConfig):
    """The package section plus ``model.name`` (the bundle names its model) and
    ``train.architecture`` (whose code the step runs)."""

    name: str
    architecture: str


@cache
def _context_digest() -> str:
    from loopline.deploy.image import image_context_files

    files = sorted(image_context_files().items())
    return sha256_bytes("".join(f"{name}={sha256_bytes(data)}\n" for name, data in files).encode())


def context_fingerprint(ctx: StepContext, params: PackageParams) -> str:
    """Cache extra for package: the serving image's files the bundle carries (Loopline's
    server source and pinned requirements), which the step copies rather than imports."""
    return _context_digest()


def parity_check(
    onnx_path: Path, torch_logits: np.ndarray, x: np.ndarray, tolerance: float
) -> float:
    """Largest |ORT - torch| logit difference on ``x``; raises when above ``tolerance``."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for start in range(0, len(x), 256):
        (ort_logits,) = session.run(["logits"], {"input": to_input(x[start : start + 256])})
        diff = float(np.abs(ort_logits - torch_logits[start : start + 256]).max())
        worst = max(worst, diff)
    if worst > tolerance:
        raise PipelineError(
            f"ONNX Runtime's logits differ from torch's by {worst:.2e} on the test split, "
            f"over package.tolerance={tolerance:g}; the export is not faithful"
        )
    return worst


def package(
    ctx: StepContext,
    weights: dict[str, np.ndarray],
    model: dict[str, Any],
    metrics: dict[str, Any],
    splits: pd.DataFrame,
    dataset: dict[str, Any],
    decision: dict[str, Any],
    params: PackageParams,
) -> bytes:
    require_extra("onnx", "train")
    from loopline.builder import trainer
    from loopline.deploy.image import image_context_files

    spec = trainer.ModelSpec.from_dict(model["spec"])
    net = trainer.load_state(spec, weights)
    test = splits[splits["split"] == "test"].reset_index(drop=True)
    x = load_images(ctx, test, spec.input_size, "test images")
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        trainer.export_onnx(net, spec.input_size, onnx_path, opset=params.opset)
        extra = [p.name for p in Path(tmp).iterdir() if p.name != "model.onnx"]
        if extra:
            raise PipelineError(f"ONNX export wrote extra files {extra}; expected one file")
        worst = parity_check(onnx_path, trainer.predict_logits(net, x), x, params.tolerance)
        ctx.log(f"ONNX Runtime matches torch on {len(x)} test images (max |diff| {worst:.2e})")
        model_bytes = onnx_path.read_bytes()

        preprocess = PreprocessSpec(height=spec.input_size, width=spec.input_size)
        # Only what the step's key covers: no run id, no git commit (the registry's lineage
        # holds those), so the same inputs always give the same bundle bytes.
        metadata = {
            "name": params.name,
            "dataset_version": dataset["version"],
            "metrics": {
                k: metrics[k] for k in ("accuracy", "macro_precision", "macro_recall", "macro_f1")
            },
            "spec": spec.to_dict(),
            "params": model["best_params"],
            "loopline_version": __version__,
            "parity_max_abs_diff": worst,
            "gate": {"accepted": decision["accepted"], "rules": decision["rules"]},
        }
        files: dict[str, bytes] = {
            "model.onnx": model_bytes,
            "labels.json": json.dumps(model["labels"]).encode(),
            "preprocess.json": json.dumps(preprocess.to_dict(), indent=2).encode(),
            "metadata.json": json.dumps(metadata, indent=2, sort_keys=True).encode(),
        }
        files["monitoring.json"] = monitoring_file(
            ctx, net, splits, spec.input_size, model["labels"]
        )
        files.update(image_context_files())
        tar = Path(tmp) / "bundle.tar"
        write_bundle(files, tar)
        data = tar.read_bytes()
    ctx.log(f"bundle: {len(files) + 1} files, {len(data) / 1e6:.2f} MB")
    return data

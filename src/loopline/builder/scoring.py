"""Scoring predictions and registered bundles: per-segment reports, and a bundle scored with
ONNX Runtime (the gate's production baseline, ``loopline evaluate``). No torch here.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from loopline.builder.images import label_indices, load_images
from loopline.errors import ConfigError
from loopline.metrics import classification_report
from loopline.pipeline import StepContext


def segment_reports(
    test: pd.DataFrame, y: np.ndarray, pred: np.ndarray, labels: list[str], segments: list[str]
) -> dict[str, dict[str, Any]]:
    """Metrics per value of each segment column; columns the data lacks are skipped."""
    out: dict[str, dict[str, Any]] = {}
    for column in segments:
        if column not in test.columns:
            continue
        values = test[column].astype(str).to_numpy()
        out[column] = {}
        for value in sorted(set(values)):
            mask = values == value
            report = classification_report(y[mask], pred[mask], labels)
            report.pop("confusion_matrix")
            out[column][value] = report
    return out


def evaluate_bundle(
    ctx: StepContext, bundle_sha256: str, records: pd.DataFrame, labels: list[str]
) -> tuple[dict[str, Any], np.ndarray]:
    """Score a registered bundle with ONNX Runtime on ``records``: (report, predictions).

    The bundle is fetched from the artifact store (its sha256 checked) and verified against
    its manifest in a private folder each time, never trusted from an earlier extraction.
    """
    import onnxruntime as ort

    from loopline.bundle import fetch_bundle, to_input

    with tempfile.TemporaryDirectory(prefix="loopline-eval-") as tmp:
        bundle = fetch_bundle(ctx.resources.artifacts, bundle_sha256, Path(tmp))
        if bundle.labels != labels:
            raise ConfigError(
                f"the registered model's labels {bundle.labels} differ from data.labels {labels}"
            )
        x = load_images(ctx, records, bundle.preprocess.height, "images (registered model)")
        session = ort.InferenceSession(
            str(bundle.model_path), ort.SessionOptions(), providers=["CPUExecutionProvider"]
        )
        preds = []
        for start in range(0, len(x), 256):
            (logits,) = session.run(["logits"], {"input": to_input(x[start : start + 256])})
            preds.append(logits.argmax(axis=1))
    pred = np.concatenate(preds) if preds else np.zeros(0, dtype=np.int64)
    return classification_report(label_indices(records, labels), pred, labels), pred

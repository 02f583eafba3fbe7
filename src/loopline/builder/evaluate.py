"""Evaluate: the candidate on the test split, overall and per segment (condition, camera).

``loopline evaluate`` (a registered model on the whole source) is
``loopline.builder.evaluate_registered``, kept out of this step's code version.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from loopline.builder.images import label_indices, load_images
from loopline.builder.scoring import segment_reports
from loopline.config import EvaluateConfig
from loopline.errors import require_extra
from loopline.metrics import classification_report
from loopline.pipeline import StepContext


class EvaluateParams(EvaluateConfig):
    """The evaluate section plus ``data.labels`` and ``train.architecture`` (whose code the
    step runs, so it is part of the key)."""

    labels: list[str]
    architecture: str


def evaluate(
    ctx: StepContext,
    splits: pd.DataFrame,
    weights: dict[str, np.ndarray],
    model: dict[str, Any],
    params: EvaluateParams,
) -> dict[str, Any]:
    require_extra("torch", "train")
    from loopline.builder import trainer

    test = splits[splits["split"] == "test"].reset_index(drop=True)
    spec = trainer.ModelSpec.from_dict(model["spec"])
    x = load_images(ctx, test, spec.input_size, "test images")
    y = label_indices(test, params.labels)
    logits = trainer.predict_logits(trainer.load_state(spec, weights), x)
    pred = logits.argmax(axis=1)
    report = classification_report(y, pred, params.labels)
    missing = [s for s in params.segments if s not in test.columns]
    if missing:
        ctx.log(f"segments not in the data, skipped: {', '.join(missing)}")
    report["segments"] = segment_reports(test, y, pred, params.labels, params.segments)
    ctx.log(
        f"test accuracy {report['accuracy']:.4f}, macro P/R/F1 {report['macro_precision']:.4f}/"
        f"{report['macro_recall']:.4f}/{report['macro_f1']:.4f} on {report['n']} images"
    )
    for column, values in report["segments"].items():
        ctx.log(
            f"by {column}: " + ", ".join(f"{v} acc={r['accuracy']:.3f}" for v, r in values.items())
        )
    return report

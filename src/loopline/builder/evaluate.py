"""Evaluate: the candidate on the test split, overall and per segment (condition, camera);
and ``evaluate_registered``, which backs ``loopline evaluate``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from loopline.builder.images import label_indices, load_images
from loopline.builder.scoring import evaluate_bundle, segment_reports
from loopline.config import EvaluateConfig
from loopline.errors import require_extra
from loopline.metrics import classification_report
from loopline.pipeline import StepContext

if TYPE_CHECKING:
    from loopline.builder.resources import BuildResources


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


def evaluate_registered(
    resources: BuildResources, ref: str, reporter: Any = None
) -> dict[str, Any]:
    """Evaluate a registered model (its ONNX bundle) on every valid record of the source.

    Used to measure a model on data it was not built from, e.g. a day-only model on fog
    and night images. The records are ingested and validated as in a build (the dataset
    version is recorded), then scored with ONNX Runtime, overall and per segment.
    """
    from loopline.builder.ingest import ingest
    from loopline.builder.record import record_dataset
    from loopline.builder.validate import ValidateParams, validate
    from loopline.pipeline.step import SilentReporter

    config = resources.config
    mv = resources.store.models.resolve(ref)
    ctx = StepContext(
        run_id="evaluate",
        step="evaluate",
        reporter=reporter or SilentReporter(),
        resources=resources.for_steps(),
    )
    labels = config.data.labels
    ingested = ingest(ctx, config.data)
    record_dataset(resources.store, config.project, ingested["dataset"], None)
    validate_params = ValidateParams.model_validate(
        {**config.validate_.model_dump(), "labels": labels}
    )
    clean = validate(ctx, ingested["records"], validate_params)["clean"]
    report, pred = evaluate_bundle(ctx, mv.bundle_sha256, clean, labels)
    y = label_indices(clean, labels)
    report["segments"] = segment_reports(clean, y, pred, labels, config.evaluate.segments)
    report["model"] = f"{mv.name}:{mv.version}"
    report["dataset_version"] = ingested["dataset"]["version"]
    return report

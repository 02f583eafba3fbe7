"""``evaluate_registered``: a registered model scored on the configured source, the
library call behind ``loopline evaluate``.

No Build step imports this module, so what it does besides scoring (recording the dataset
version it ingested) stays out of every step's code version.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from loopline.builder.images import label_indices
from loopline.builder.ingest import ingest
from loopline.builder.pipeline import build_pipeline
from loopline.builder.record import record_dataset
from loopline.builder.resources import BuildResources
from loopline.builder.scoring import evaluate_bundle, segment_reports
from loopline.builder.validate import validate
from loopline.pipeline import StepContext
from loopline.pipeline.step import Reporter, SilentReporter


def evaluate_registered(
    resources: BuildResources, ref: str, reporter: Reporter | None = None
) -> dict[str, Any]:
    """Evaluate a registered model (its ONNX bundle) on every valid record of the source.

    Used to measure a model on data it was not built from, e.g. a day-only model on fog
    and night images. The records are ingested and validated as in a build, each step
    given the params it selects from the config (the dataset version is recorded), then
    scored with ONNX Runtime, overall and per segment.
    """
    config = resources.config
    mv = resources.store.models.resolve(ref)
    steps = build_pipeline()
    raw = config.to_dict()
    ctx = StepContext(
        run_id="evaluate",
        step="evaluate",
        reporter=reporter or SilentReporter(),
        resources=resources.for_steps(),
    )
    ingested = ingest(ctx, steps.step("ingest").select_params(raw))
    record_dataset(resources.store, config.project, ingested["dataset"], None)
    clean = validate(ctx, ingested["records"], steps.step("validate").select_params(raw))["clean"]
    params = steps.step("evaluate").select_params(raw)
    report, pred = evaluate_bundle(ctx, mv.bundle_sha256, clean, params.labels)
    y = label_indices(clean, params.labels)
    report["segments"] = segment_reports(clean, y, pred, params.labels, params.segments)
    report["model"] = f"{mv.name}:{mv.version}"
    report["dataset_version"] = ingested["dataset"]["version"]
    return report


def score_bundle(
    artifacts: Any,
    source: Any,
    bundle_sha256: str,
    records: pd.DataFrame,
    labels: list[str],
    *,
    reporter: Any = None,
) -> tuple[dict[str, Any], np.ndarray]:
    """``evaluate_bundle`` outside a build: ``records`` read from ``source`` (each checked
    against its ``sha256`` column), the bundle from ``artifacts``. The retrain loop's gate
    scores the candidate and the incumbent on held-out production captures with it."""
    from loopline.builder.resources import StepResources

    resources = StepResources(source, artifacts, lambda name, alias: None)
    ctx = StepContext("score", "score", reporter or SilentReporter(), resources)
    return evaluate_bundle(ctx, bundle_sha256, records, labels)

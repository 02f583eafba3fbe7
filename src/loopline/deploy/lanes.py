"""What serves one model version inside a server: its batcher, its batch hook, the log.

Each version a server holds (one for ``loopline serve MODEL``, those of the deployment for
``--env``) has a batcher of its own; its hook observes each batch's metrics and writes the
prediction rows, on the batcher thread, off the request path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from loopline.deploy.metrics import ServerMetrics
from loopline.deploy.predlog import PredictionLog
from loopline.deploy.router import Tagged
from loopline.deploy.runtime import Batcher, Job, JobResult, ServedModel
from loopline.deploy.settings import ServeSettings


def prediction_log(
    settings: ServeSettings, store: Any | None, metrics: ServerMetrics, spill_dir: Path | None
) -> PredictionLog | None:
    """The prediction log of a server (None when logging is off or no store is open)."""
    if not settings.log_predictions or store is None:
        return None
    return PredictionLog(
        store.predictions.log,
        flush_interval_s=settings.flush_interval_s,
        flush_max_rows=settings.flush_max_rows,
        max_pending_rows=settings.max_pending_rows,
        write_attempts=settings.log_write_attempts,
        spill_dir=spill_dir or settings.spill_dir or Path.cwd(),
        on_written=metrics.log_rows_written,
        on_dropped=metrics.log_rows_dropped,
        on_spilled=metrics.log_rows_spilled,
    )


def make_batcher(
    served: ServedModel,
    settings: ServeSettings,
    metrics: ServerMetrics,
    predlog: PredictionLog | None,
    environment: str | None = None,
) -> Batcher:
    """The batcher of one served version (each version has its own)."""
    return Batcher(
        served.runtime,
        max_batch_size=settings.max_batch_size,
        max_delay_ms=settings.max_delay_ms,
        max_queue=settings.max_queue,
        max_queue_bytes=settings.max_queue_bytes,
        max_pixels=settings.max_image_pixels,
        threads=settings.inference_threads,
        on_batch=batch_hook(served, settings, metrics, predlog, environment),
    )


def batch_hook(
    served: ServedModel,
    settings: ServeSettings,
    metrics: ServerMetrics,
    predlog: PredictionLog | None,
    environment: str | None = None,
) -> Any:
    """Metrics and prediction-log rows for each batch, on the batcher thread.

    Behind a router, each job's metadata is ``Tagged`` with the variant that answered
    (stable, canary, shadow, or addressed: the request named its version) and the
    deployment generation; the rows keep both.
    """
    name, version, labels = served.name, served.version, served.labels
    keep_probs = settings.log_probabilities

    def on_batch(jobs: list[Job], results: list[JobResult], seconds: float) -> None:
        top = np.concatenate([r.top for r in results])
        conf = np.concatenate([r.confidence for r in results])
        metrics.observe_batch(len(top), seconds, top, conf)
        if predlog is None:
            return
        rows = []
        for job, res in zip(jobs, results, strict=True):
            probs = np.round(res.probabilities, 6).tolist() if keep_probs else [None] * job.n
            meta = job.metadata
            variant = generation = camera = None
            if isinstance(meta, Tagged):  # routed: empty when the request had no metadata
                variant, generation = meta.variant, meta.generation
                meta = dict(meta) or None
            if meta:
                camera = meta.get("camera_id")
                camera = None if camera is None else str(camera)[:200]
            for pid, t, c, p, stats in zip(
                res.ids, res.top.tolist(), res.confidence.tolist(), probs, job.stats, strict=True
            ):
                rows.append(
                    {
                        "id": pid,
                        "at": job.received,
                        "model_name": name,
                        "model_version": version,
                        "source": job.source,
                        "label": labels[t],
                        "confidence": c,
                        "probabilities": p,
                        "request_metadata": meta,
                        "input_stats": stats,
                        "environment": environment,
                        "deployment_generation": generation,
                        "variant": variant,
                        "camera_id": camera,
                    }
                )
        predlog.add(rows)

    return on_batch

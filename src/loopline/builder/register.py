"""Register: a new model version with alias ``candidate``, metrics, bundle and lineage."""

from __future__ import annotations

import hashlib
from typing import Any

from loopline import __version__
from loopline.builder.package import git_commit
from loopline.config import ModelConfig
from loopline.metrics import headline
from loopline.pipeline import StepContext


def register(
    ctx: StepContext,
    bundle: bytes,
    metrics: dict[str, Any],
    model: dict[str, Any],
    dataset: dict[str, Any],
    decision: dict[str, Any],
    params: ModelConfig,
) -> dict[str, Any]:
    res = ctx.resources
    digest = hashlib.sha256(bundle).hexdigest()
    if not res.artifacts.exists(digest):  # pragma: no cover - the engine stored it
        res.artifacts.put_bytes(bundle)
    summary: dict[str, Any] = dict(headline(metrics))
    summary["per_class"] = metrics["per_class"]
    summary["segments"] = {
        column: {value: headline(r) for value, r in values.items()}
        for column, values in metrics.get("segments", {}).items()
    }
    mv = res.store.register_model(
        params.name,
        actor=res.actor,
        metrics=summary,
        bundle_uri=res.artifacts.uri(digest),
        bundle_sha256=digest,
        dataset_version=dataset["version"],
        run_id=ctx.run_id,
        lineage={
            "dataset_version": dataset["version"],
            "dataset_source": dataset["source"],
            "run_id": ctx.run_id,
            "git_commit": git_commit(res.config.root),
            "loopline_version": __version__,
            "params": model["best_params"],
            "spec": model["spec"],
            "gate": decision,
        },
    )
    ctx.log(f"registered {mv.name}:{mv.version} (alias candidate)")
    return {"name": mv.name, "version": mv.version, "bundle_sha256": digest}

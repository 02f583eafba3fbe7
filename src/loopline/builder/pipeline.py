"""The Build pipeline assembled from its steps, and ``build()``: the one entry point that the
CLI, the demo and (later) the retraining loop all call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from loopline.builder.evaluate import EvaluateParams, evaluate
from loopline.builder.gate import GateParams, gate, halt_if_rejected, production_fingerprint
from loopline.builder.ingest import ingest, source_fingerprint
from loopline.builder.package import git_commit, package
from loopline.builder.register import register
from loopline.builder.resources import BuildResources
from loopline.builder.split import split
from loopline.builder.train import TrainParams, train
from loopline.builder.validate import ValidateParams, validate
from loopline.config import Config, parse_config
from loopline.drivers.artifacts import ArtifactStore
from loopline.drivers.metadata.store import MetadataStore
from loopline.pipeline import Pipeline, Runner, RunResult, Step
from loopline.pipeline.step import Reporter


def build_pipeline() -> Pipeline:
    return Pipeline(
        "build",
        [
            Step(
                "ingest",
                ingest,
                outputs=("records", "dataset"),
                params="data",
                cache_extra=source_fingerprint,
            ),
            Step(
                "validate",
                validate,
                inputs=("records",),
                outputs=("clean", "quarantine", "report"),
                params="validate",
            ),
            Step("split", split, inputs=("clean",), outputs=("splits",), params="split"),
            Step("train", train, inputs=("splits",), outputs=("weights", "model"), params="train"),
            Step(
                "evaluate",
                evaluate,
                inputs=("splits", "weights", "model"),
                outputs=("metrics",),
                params="evaluate",
            ),
            Step(
                "gate",
                gate,
                inputs=("metrics", "splits"),
                outputs=("decision",),
                params="gate",
                cache_extra=production_fingerprint,
                halt=halt_if_rejected,
            ),
            Step(
                "package",
                package,
                inputs=("weights", "model", "metrics", "splits", "dataset", "decision"),
                outputs=("bundle",),
                params="package",
            ),
            Step(
                "register",
                register,
                inputs=("bundle", "metrics", "model", "dataset", "decision"),
                outputs=("registered",),
                params="model",
            ),
        ],
    )


def step_sections(config: Config) -> dict[str, BaseModel]:
    """Each step's parameters: its config section, plus the labels where it needs them."""
    labels = {"labels": config.data.labels}
    return {
        "data": config.data,
        "validate": ValidateParams.model_validate({**config.validate_.model_dump(), **labels}),
        "split": config.split,
        "train": TrainParams.model_validate({**config.train.model_dump(), **labels}),
        "evaluate": EvaluateParams.model_validate({**config.evaluate.model_dump(), **labels}),
        "gate": GateParams.model_validate({**config.gate.model_dump(), **labels}),
        "package": config.package,
        "model": config.model,
    }


def preflight(config: Config) -> None:
    """Fail fast, before any work, on what the config gets wrong."""
    import importlib.util

    from loopline.builder.gate import parse_rule
    from loopline.drivers.data import open_source
    from loopline.errors import ConfigError

    arch = config.train.architecture
    if arch != "cnn":
        module, _, cls = arch.partition(":")
        found = None
        if module and cls:
            try:
                found = importlib.util.find_spec(module)
            except (ImportError, ValueError):
                found = None
        if found is None:
            raise ConfigError(
                f"unknown architecture {arch!r}: use 'cnn' or 'package.module:ClassName' "
                "naming an importable torch.nn.Module"
            )
    for rule in config.gate.rules:
        parse_rule(rule)
    open_source(config)


@dataclass
class BuildResult:
    run_id: str
    status: str  # succeeded | rejected
    model: dict[str, Any] | None
    metrics: dict[str, Any] | None
    reason: str | None
    steps: list[dict[str, Any]] = field(default_factory=list)


def open_stores(config: Config) -> tuple[MetadataStore, ArtifactStore]:
    return MetadataStore(config.metadata_url()), ArtifactStore(config.artifacts_url())


def build(
    config: Config,
    *,
    resume: str | None = None,
    reporter: Reporter | None = None,
    trigger: str = "manual",
    trigger_ref: str | None = None,
    actor: str = "loopline",
    use_cache: bool = True,
    stores: tuple[MetadataStore, ArtifactStore] | None = None,
) -> BuildResult:
    """Run the Build pipeline on ``config``; with ``resume``, continue that failed run.

    A resumed run uses the configuration it was started with. Raises LooplineError on
    failure (the run is recorded as failed and can be resumed).
    """
    store, artifacts = stores or open_stores(config)
    if resume is not None:
        previous = store.get_run(resume)
        config = parse_config(previous.config, config.root, f"run {previous.id}")
        resume = previous.id
    preflight(config)
    resources = BuildResources(config=config, store=store, artifacts=artifacts, actor=actor)

    def record_lineage(run_id: str, step: str, values: dict[str, Any]) -> None:
        if step == "ingest":
            store.update_run(run_id, dataset_version=values["dataset"]["version"])
        elif step == "register":
            reg = values["registered"]
            store.update_run(run_id, model_name=reg["name"], model_version=reg["version"])

    runner = Runner(
        store,
        artifacts,
        reporter=reporter,
        resources=resources,
        use_cache=use_cache,
        after_step=record_lineage,
    )
    result: RunResult = runner.run(
        build_pipeline(),
        step_sections(config),
        config=config.to_dict(),
        project=config.project,
        run_id=resume,
        resume=resume is not None,
        trigger=trigger,
        trigger_ref=trigger_ref,
        git_commit=git_commit(config.root),
    )
    registered = result.values.get("registered")
    model = None
    if registered:
        mv = store.get_model_version(registered["name"], registered["version"])
        model = store.model_version_dict(mv)
    return BuildResult(
        run_id=result.run_id,
        status=result.status,
        model=model,
        metrics=result.values.get("metrics"),
        reason=result.reason,
        steps=[
            {"step": s.step, "status": s.status, "seconds": round(s.seconds, 3)}
            for s in result.steps
        ],
    )

"""The Build pipeline assembled from its steps, and ``build()``: the one entry point that the
CLI, the demo and (later) the retraining loop all call.

Each step declares the config keys it reads (``params``); only those reach it and only those
enter its cache key. Steps return values; ``BuildRecorder`` records the dataset version after
ingest and registers the bundle after package, also when every step came from the cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from loopline.builder.evaluate import EvaluateParams, evaluate
from loopline.builder.gate import GateParams, gate, halt_if_rejected, production_fingerprint
from loopline.builder.ingest import ingest, source_fingerprint, source_modules
from loopline.builder.package import PackageParams, context_fingerprint, package
from loopline.builder.record import BuildRecorder, git_commit
from loopline.builder.resources import BuildResources
from loopline.builder.split import split
from loopline.builder.train import TrainParams, architecture_modules, train
from loopline.builder.validate import ValidateParams, validate
from loopline.config import Config, DataConfig, SplitConfig, parse_config
from loopline.drivers.artifacts import ArtifactStore
from loopline.drivers.metadata.store import MetadataStore
from loopline.pipeline import Pipeline, Runner, RunResult, Step
from loopline.pipeline.step import Reporter, SilentReporter


def build_pipeline() -> Pipeline:
    return Pipeline(
        "build",
        [
            Step(
                "ingest",
                ingest,
                outputs=("records", "dataset"),
                params=("data",),
                params_type=DataConfig,
                code_modules=source_modules,
                cache_extra=source_fingerprint,
            ),
            Step(
                "validate",
                validate,
                inputs=("records",),
                outputs=("clean", "quarantine", "report"),
                params=("validate", "data.labels"),
                params_type=ValidateParams,
            ),
            Step(
                "split",
                split,
                inputs=("clean",),
                outputs=("splits",),
                params=("split",),
                params_type=SplitConfig,
            ),
            Step(
                "train",
                train,
                inputs=("splits",),
                outputs=("weights", "model"),
                params=("train", "data.labels"),
                params_type=TrainParams,
                code_modules=architecture_modules,
            ),
            Step(
                "evaluate",
                evaluate,
                inputs=("splits", "weights", "model"),
                outputs=("metrics",),
                params=("evaluate", "data.labels", "train.architecture"),
                params_type=EvaluateParams,
                code_modules=architecture_modules,
            ),
            Step(
                "gate",
                gate,
                inputs=("metrics", "splits"),
                outputs=("decision",),
                params=("gate", "data.labels", "model.name"),
                params_type=GateParams,
                cache_extra=production_fingerprint,
                halt=halt_if_rejected,
            ),
            Step(
                "package",
                package,
                inputs=("weights", "model", "metrics", "splits", "dataset", "decision"),
                outputs=("bundle",),
                params=("package", "model.name", "train.architecture"),
                params_type=PackageParams,
                code_modules=architecture_modules,
                cache_extra=context_fingerprint,
            ),
        ],
    )


def preflight(config: Config) -> None:
    """Fail fast, before any step runs, on what the config gets wrong.

    Checks the architecture (a torch.nn.Module class, when the train extra is installed to
    import it), every gate rule's metric against the evaluation report's shape, and that the
    data source opens.
    """
    from loopline.builder.gate import check_metrics, parse_rule
    from loopline.drivers.data import open_source

    check_architecture(config.train.architecture)
    for rule in config.gate.rules:
        parse_rule(rule)
    # The params exactly as the runner will select them for the steps.
    steps, raw = build_pipeline(), config.to_dict()
    segments = steps.step("evaluate").select_params(raw).segments
    check_metrics(steps.step("gate").select_params(raw), segments)
    open_source(config)


def check_architecture(arch: str) -> None:
    """ConfigError unless ``arch`` is 'cnn' or names an importable torch.nn.Module class.

    The user's module is imported only when torch is installed (the train extra); without
    it only the module's presence is checked, and training itself names the missing extra.
    """
    import importlib.util

    from loopline.errors import ConfigError

    if arch == "cnn":
        return
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
    if importlib.util.find_spec("torch") is None:
        return
    from loopline.builder.trainer import architecture_class

    architecture_class(arch)


@dataclass
class BuildResult:
    """How a build ended. ``model`` is the registered version, or the existing version the
    bundle equals (then ``registered`` is False and ``equals`` names it)."""

    run_id: str
    status: str  # succeeded | rejected
    model: dict[str, Any] | None
    metrics: dict[str, Any] | None
    reason: str | None
    steps: list[dict[str, Any]] = field(default_factory=list)
    registered: bool = False
    equals: dict[str, Any] | None = None


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
        previous = store.runs.get(resume)
        stored = parse_config(previous.config, config.root, f"run {previous.id}")
        config = stored.with_credentials_from(config)  # passwords are never stored
        resume = previous.id
    preflight(config)
    resources = BuildResources(config=config, store=store, artifacts=artifacts, actor=actor)
    commit = git_commit(config.root)
    recorder = BuildRecorder(
        store,
        artifacts,
        project=config.project,
        model_name=config.model.name,
        git_commit=commit,
        actor=actor,
        reporter=reporter or SilentReporter(),
    )
    runner = Runner(
        store,
        artifacts,
        reporter=reporter,
        resources=resources.for_steps(),
        use_cache=use_cache,
        recorder=recorder,
    )
    result: RunResult = runner.run(
        build_pipeline(),
        config.to_dict(),
        project=config.project,
        run_id=resume,
        resume=resume is not None,
        trigger=trigger,
        trigger_ref=trigger_ref,
        git_commit=commit,
    )
    mv = recorder.version if result.status == "succeeded" else None
    return BuildResult(
        run_id=result.run_id,
        status=result.status,
        model=store.models.as_dict(mv) if mv is not None else None,
        metrics=result.values.get("metrics"),
        reason=result.reason,
        steps=[
            {"step": s.step, "status": s.status, "seconds": round(s.seconds, 3)}
            for s in result.steps
        ],
        registered=mv is not None and recorder.created,
        equals=(
            {"name": mv.name, "version": mv.version}
            if mv is not None and not recorder.created
            else None
        ),
    )

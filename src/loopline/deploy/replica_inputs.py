"""What a replica test sends: the candidate's held-out test split, and a sample of recorded
production requests whose images were captured.

The test split is the build's own: the ``split`` step's output of the run that built the
model, read back from the artifact store. When that is gone (or the model has no build
run: an imported model), it is recomputed exactly as a build computes it: the source
ingested and validated with the build's params, then split by content hash with the run's
split config. The records' source is the one the build read, from the build run's config
(a model the retrain loop built reads ``data.also``'s labelled captures, which the
project's config does not list), with the project's stores and credentials; the project's
config when there is no run. Each image is read from the source and checked against the
sha256 recorded at ingest.

Production requests can be replayed only when their image was captured (table
``captures``); a prediction logged without an image keeps only its input statistics, which
no model can be run on, so those are counted and reported, never replayed. Each carries
its feedback label when one arrived, so the replay can judge it by ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pandas as pd
from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from loopline.digest import sha256_bytes
from loopline.errors import DataSourceError, NotFound

if TYPE_CHECKING:
    from datetime import datetime

    from loopline.config import Config
    from loopline.drivers.artifacts import ArtifactStore
    from loopline.drivers.data import DataSource
    from loopline.drivers.metadata.models import ModelVersion, PipelineRun
    from loopline.drivers.metadata.store import MetadataStore
    from loopline.pipeline.step import Reporter


def media_type(data: bytes) -> str:
    """The image type of ``data`` from its first bytes (octet-stream when unknown)."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8"):
        return "image/jpeg"
    return "application/octet-stream"


@dataclass
class TestSplit:
    """The held-out test records of a model version and where they came from."""

    __test__ = False  # not a pytest class

    records: pd.DataFrame  # path, sha256, label and the source's metadata columns
    source: DataSource
    origin: str  # in words: which build's split, or how it was recomputed
    dataset_version: str | None
    total: int  # test records before ``max_test_images``
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    def read(self, i: int) -> bytes:
        """The bytes of record ``i``, verified against the sha256 recorded at ingest."""
        path, digest = self.records["path"].iloc[i], self.records["sha256"].iloc[i]
        data = self.source.read_bytes(path)
        if sha256_bytes(data) != digest:
            raise DataSourceError(
                f"{path} changed since it was ingested (sha256 mismatch); the test split "
                "cannot be read as the build read it (re-build the model on the new data)"
            )
        return data

    def describe(self) -> dict[str, Any]:
        return {
            "origin": self.origin,
            "dataset_version": self.dataset_version,
            "images": len(self.records),
            "test_records": self.total,
            "per_class": {
                str(k): int(v) for k, v in self.records["label"].value_counts().sort_index().items()
            },
        }


def build_config(config: Config, run: PipelineRun | None) -> tuple[Config, str | None]:
    """The config ``run`` was built with, over the project's stores, credentials taken
    from ``config``; ``config`` itself when there is no run. Returns (config, note): the
    note says why the run's config could not be used."""
    from loopline.config import parse_config
    from loopline.errors import ConfigError

    if run is None or not run.config:
        return config, None
    # The stores are the project's: the model and its captures are in them, wherever the
    # build's config said the stores were at the time.
    raw = {**run.config, "store": config.to_dict()["store"]}
    try:
        stored = parse_config(raw, config.root, f"the config of build run {run.id}")
    except ConfigError as err:
        return config, f"{err}; the project's data source is read instead"
    return stored.with_credentials_from(config), None


def _context(config: Config, artifacts: ArtifactStore, reporter: Reporter | None) -> Any:
    from loopline.builder.resources import StepResources
    from loopline.drivers.data import open_source
    from loopline.pipeline import StepContext
    from loopline.pipeline.step import SilentReporter

    resources = StepResources(open_source(config), artifacts, lambda name, alias: None)
    return StepContext("replica-test", "test split", reporter or SilentReporter(), resources)


def _build_split(store: MetadataStore, artifacts: ArtifactStore, run_id: str) -> Any:
    """The ``split`` output of build run ``run_id``, or None when it is not stored."""
    from loopline.pipeline import codecs

    for step in store.steps.for_run(run_id):
        ref = (step.outputs or {}).get("splits") if step.step == "split" else None
        if step.status == "succeeded" and ref and artifacts.exists(ref["sha256"]):
            return codecs.decode(ref["codec"], artifacts.get_bytes(ref["sha256"]))
    return None


def dataset_splits(
    config: Config,
    store: MetadataStore,
    artifacts: ArtifactStore,
    mv: ModelVersion,
    reporter: Reporter | None = None,
) -> tuple[pd.DataFrame, Any, str, list[str]]:
    """Every record of ``mv``'s dataset with its split: (splits, context, origin, notes).

    ``context`` is a StepContext whose ``resources.source`` reads the records' files.
    """
    from loopline.builder.ingest import ingest
    from loopline.builder.pipeline import build_pipeline
    from loopline.builder.split import split
    from loopline.builder.validate import validate

    run = None
    if mv.run_id:
        try:
            run = store.runs.get(mv.run_id)
        except NotFound:
            run = None
    built_with, note = build_config(config, run)
    ctx = _context(built_with, artifacts, reporter)
    notes = [note] if note else []
    if mv.run_id:
        found = _build_split(store, artifacts, mv.run_id)
        if found is not None:
            return found, ctx, f"the split of build run {mv.run_id}", notes
        notes.append(f"the split of build run {mv.run_id} is no longer stored; recomputed")
    steps, raw = build_pipeline(), built_with.to_dict()
    ingested = ingest(ctx, steps.step("ingest").select_params(raw))
    version = ingested["dataset"]["version"]
    clean = validate(ctx, ingested["records"], steps.step("validate").select_params(raw))["clean"]
    split_raw = run.config if run is not None and "split" in (run.config or {}) else raw
    splits = split(ctx, clean, steps.step("split").select_params(split_raw))
    built_on = mv.dataset_version
    if built_on is None:
        origin = (
            f"the configured source's records ({ingested['dataset']['source']}), split as a "
            "build splits them (the model has no dataset of its own)"
        )
    else:
        origin = f"dataset {built_on[:12]} recomputed from {ingested['dataset']['source']}"
        if built_on != version:
            notes.append(
                f"the source changed since {mv.name}:{mv.version} was built (dataset "
                f"{built_on[:12]}, now {version[:12]}); its test split is taken from the "
                "current records, by content hash as the build split them"
            )
    return splits, ctx, origin, notes


def load_test_split(
    config: Config,
    store: MetadataStore,
    artifacts: ArtifactStore,
    mv: ModelVersion,
    *,
    max_images: int | None = None,
    reporter: Reporter | None = None,
) -> TestSplit:
    """The held-out test split of ``mv`` (at most ``max_images``, a fixed subset)."""
    splits, ctx, origin, notes = dataset_splits(config, store, artifacts, mv, reporter)
    test = splits[splits["split"] == "test"].reset_index(drop=True)
    if test.empty:
        raise DataSourceError(
            f"the test split of {mv.name}:{mv.version} ({origin}) is empty; nothing to test"
        )
    total = len(test)
    if max_images is not None and total > max_images:
        # A subset that does not depend on the order of the records: the smallest digests.
        keep = test.sort_values("sha256", kind="stable").head(max_images).index
        test = test.loc[sorted(keep)].reset_index(drop=True)
        notes.append(f"{max_images} of {total} test images (replica_test.max_test_images)")
    return TestSplit(test, ctx.resources.source, origin, mv.dataset_version, total, notes)


# -- recorded production requests ----------------------------------------------------------------
@dataclass(frozen=True)
class ReplayItem:
    prediction_id: str
    sha256: str
    media_type: str
    label: str  # what production answered
    model: str  # the version that answered, NAME:VERSION
    truth: str | None = None  # the feedback label (ground truth), when one arrived


@dataclass
class ReplaySample:
    """Recorded requests of the ``live`` environment to send to the candidate again."""

    live: str | None
    items: list[ReplayItem]
    without_image: int  # predictions logged there with no captured image (not replayable)
    artifacts: ArtifactStore | None = None
    skip_reason: str | None = None

    def read(self, item: ReplayItem) -> bytes:
        """The captured image (verified by sha256); NotFound once purged."""
        if self.artifacts is None:
            raise NotFound("no artifact store to read captured images from")
        return self.artifacts.get_bytes(item.sha256)


def replay_sample(
    store: MetadataStore,
    artifacts: ArtifactStore,
    live: str | None,
    limit: int,
    *,
    since: datetime | None = None,
) -> ReplaySample:
    """The ``limit`` latest captured requests that ``live`` answered (its stable version:
    canary and shadow answers are not production's), each with its feedback label if any;
    with ``since``, only those predicted from then on (a retrained candidate's training
    data is older)."""
    from loopline.drivers.metadata.models import Capture, Feedback, Prediction

    if live is None:
        return ReplaySample(None, [], 0, artifacts, "the environment replicates none "
                            "(replica_of is not set)")  # fmt: skip
    if limit == 0:
        return ReplaySample(live, [], 0, artifacts, "replay is off (replica_test.replay: 0)")
    answered = or_(Prediction.variant.is_(None), Prediction.variant == "stable")
    if since is not None:
        answered = and_(answered, Prediction.at >= since)
    q = (
        select(Capture.prediction_id, Capture.sha256, Capture.media_type, Prediction.label,
               Prediction.model_name, Prediction.model_version, Feedback.label)
        .join(Prediction, Prediction.id == Capture.prediction_id)
        .outerjoin(Feedback, Feedback.prediction_id == Capture.prediction_id)
        .where(Prediction.environment == live, answered)
        .order_by(Capture.at.desc(), Capture.prediction_id)
        .limit(limit)
    )  # fmt: skip
    blind = (
        select(func.count())
        .select_from(Prediction)
        .outerjoin(Capture, Capture.prediction_id == Prediction.id)
        .where(Prediction.environment == live, answered, Capture.prediction_id.is_(None))
    )
    with Session(store.engine) as s:
        items = [ReplayItem(pid, sha, mt, label, f"{name}:{ver}", truth or None)
                 for pid, sha, mt, label, name, ver, truth in s.execute(q)]  # fmt: skip
        without = int(s.scalar(blind) or 0)
    reason = None
    if not items:
        reason = f"no recorded {live} requests with a captured image"
        if since is not None:
            reason += f" since {since.isoformat()} (the candidate trained on the older ones)"
        if without:
            reason += (
                f" ({without} logged without their image cannot be replayed: only their "
                "input statistics are kept; turn capture on to replay them)"
            )
    return ReplaySample(live, items, without, artifacts, reason)

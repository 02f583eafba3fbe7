"""The steps of a retrain loop that make and judge a candidate: dataset, build, gate and
approval (``loopline.monitor.loop`` runs them, and holds the release steps).

Each step reads the loop, does its work, and writes its result with the next step in one
``store.loops.advance`` (or returns None: it waits, and looks again on the next advance).
Each is safe to run again after a crash: the dataset is recomputed the same, the build
resumes its recorded run (or reads back one that ended), the gate re-scores.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loopline.clock import parse, utc
from loopline.drivers.data.captures import PREFIX, CapturesSource, parse_time
from loopline.drivers.metadata.loops import LoopRecord
from loopline.monitor import retrain_data as data
from loopline.monitor.retrain_data import release_captures

if TYPE_CHECKING:
    from loopline.config import Config
    from loopline.drivers.artifacts import ArtifactStore
    from loopline.drivers.metadata.store import MetadataStore
    from loopline.pipeline.step import Progress, Reporter

ACTOR = "loopline (monitor)"
GATE_PREFIX = "the retrained model was rejected by the gate: "
StepFn = Callable[["LoopContext", LoopRecord], "LoopRecord | None"]


@dataclass
class LoopContext:
    """What the steps of one ``advance`` share: config, stores, and who holds the loop."""

    config: Config
    store: MetadataStore
    artifacts: ArtifactStore
    owner: str
    reporter: Reporter | None = None
    config_path: Path | None = None

    def save(
        self, loop: LoopRecord, event: dict[str, Any] | None = None, **fields: Any
    ) -> LoopRecord:
        return self.store.loops.advance(loop.id, self.owner, event=event, **fields)

    def note(self, loop: LoopRecord, kind: str, message: str, **details: Any) -> None:
        """An event on the loop's alert (``loop.<kind>``)."""
        self.store.alerts.add_event(
            loop.alert_id, f"loop.{kind}", message, ACTOR, {"loop_id": loop.id, **details}
        )

    def finish(
        self, loop: LoopRecord, status: str, reason: str | None, **fields: Any
    ) -> LoopRecord:
        """End the loop (succeeded, rejected or failed) and say so on its alert, in one
        transaction (the alert's reason too, unless it succeeded)."""
        done = self.store.loops.finish(loop.id, self.owner, status, reason, actor=ACTOR, **fields)
        release_captures(self.store, done)  # retention may take what it kept
        return done

    def wait(self, loop: LoopRecord, reason: str, step: str | None = None) -> LoopRecord | None:
        """Record why the loop waits (a timeline entry only when the wait begins)."""
        if loop.reason == reason:
            return None
        began = (loop.reason or "").split(" (")[0] != reason.split(" (")[0]
        event = {"step": step or loop.step, "status": "waiting", "detail": reason}
        self.save(loop, event=event if began else None, reason=reason)
        return None

    @property
    def policy(self) -> Any:
        return self.config.monitor.retrain


def captures(
    ctx: LoopContext, loop: LoopRecord, since: datetime | None, until: datetime | None = None
) -> CapturesSource:
    """The labelled captures of the loop's environment and model in [since, until)."""
    return CapturesSource(
        environment=loop.environment,
        model_name=loop.model_name,
        since=since,
        until=until,
        store=ctx.store,
        artifacts=ctx.artifacts,
    )


def replay_since(loop: LoopRecord) -> datetime | None:
    """Where the candidate's replica test replays production from: its training captures
    were predicted before (None for a loop without a dataset step: replay them all)."""
    until = loop.state.get("until")
    return parse(until) if until else None


def build_config(ctx: LoopContext, loop: LoopRecord) -> Config:
    """The incumbent's build config with the loop's captures added (``data.also``), the
    gate comparing against the environment's version, and ``retrain.set`` applied."""
    return data.retrain_config(ctx.config, ctx.store, loop)


# -- dataset -------------------------------------------------------------------------------
def dataset(ctx: LoopContext, loop: LoopRecord) -> LoopRecord | None:
    """Enough labelled captures since the incumbent's training data ends? Then hold the
    newest out for the gate, and mark them all so that retention keeps them."""
    mv = ctx.store.models.get(loop.model_name, loop.incumbent_version)
    raw = data.previous_config(ctx.config, ctx.store, mv)
    since = data.new_data_since(raw, loop, mv.created_at)
    labels, policy = list(ctx.config.data.labels), ctx.policy
    n = data.count_labelled(ctx.store, loop, since, labels)
    need = max(policy.min_new_labels, policy.holdout_min + 1)
    if n < need:
        return ctx.wait(loop, f"waiting for labels ({n} of {need})")
    k = min(policy.holdout_max, max(policy.holdout_min, math.ceil(policy.holdout_share * n)))
    held = data.select_holdout(ctx.store, loop, since, labels, k, policy.holdout_max)
    train = captures(ctx, loop, since, held.until).list_records()
    train_ids = [p[len(PREFIX) :] for p in train["path"]]
    marked = ctx.store.captures.mark_used([*train_ids, *held.ids], data.loop_marker(loop.id))
    state = {
        **loop.state,
        "since": since.isoformat(),
        "until": held.until.isoformat(),
        "holdout_end": held.end.isoformat(),
        "labelled": n,
        "train_captures": len(train),
        "holdout": held.ids,
        "captures_marked": marked,
    }
    detail = (
        f"{n} labelled captures since {since.isoformat()}: {len(train)} added to the "
        f"training data, {len(held.ids)} from {held.until.isoformat()} held out for the gate"
    )
    return ctx.save(
        loop,
        event={"step": "dataset", "status": "succeeded", "detail": detail},
        step="build",
        reason=None,
        state=state,
    )


# -- build ---------------------------------------------------------------------------------
class _RunReporter:
    """Passes everything on, and records the build's run id in the loop at its first step."""

    def __init__(self, ctx: LoopContext, loop: LoopRecord, inner: Reporter | None) -> None:
        from loopline.pipeline.step import SilentReporter

        self.ctx, self.loop, self.inner = ctx, loop, inner or SilentReporter()
        self.run_id: str | None = None

    def step_started(self, step: str) -> None:
        if self.run_id is None:
            run = _alert_run(self.ctx.store, self.loop, mine=True)
            if run is not None:
                self.run_id = run.id
                self.ctx.save(
                    self.loop,
                    event={"step": "build", "status": "running", "detail": f"build run {run.id}"},
                    run_id=run.id,
                )
        self.inner.step_started(step)

    def step_finished(self, step: str, status: str, seconds: float, note: str = "") -> None:
        self.inner.step_finished(step, status, seconds, note)

    def log(self, step: str, message: str) -> None:
        self.inner.log(step, message)

    def progress(self, step: str, total: int | None, description: str) -> Progress:
        return self.inner.progress(step, total, description)


def _alert_run(store: MetadataStore, loop: LoopRecord, *, mine: bool = False) -> Any:
    """The newest build run this loop's alert triggered (``mine``: running in this process)."""
    started = loop.started_at or datetime.min.replace(tzinfo=UTC)
    for run in store.runs.recent(limit=200):
        if run.trigger != "alert" or run.trigger_ref != str(loop.alert_id):
            continue
        if utc(run.started_at) < started:
            continue
        if mine and (run.status != "running" or run.pid != os.getpid()):
            continue
        return run
    return None


def build(ctx: LoopContext, loop: LoopRecord) -> LoopRecord | None:
    """Run the Build pipeline on the retrain config (or resume / read back its run)."""
    from loopline.builder.pipeline import build as run_build

    run_id = loop.run_id
    if run_id is None:
        found = _alert_run(ctx.store, loop)  # started, then killed before it was recorded
        run_id = found.id if found is not None else None
        if run_id is not None:
            loop = ctx.save(loop, run_id=run_id)
    stores = (ctx.store, ctx.artifacts)
    if run_id is not None:
        run = ctx.store.runs.get(run_id)
        if run.status == "running":
            return ctx.wait(loop, f"build run {run_id} is running (pid {run.pid} on {run.host})")
        if run.status in ("failed", "interrupted"):
            ctx.save(
                loop,
                event={
                    "step": "build",
                    "status": "resumed",
                    "detail": f"resuming build run {run_id} ({run.status})",
                },
            )
            run_build(ctx.config, resume=run_id, reporter=ctx.reporter, actor=ACTOR, stores=stores)
    else:
        reporter = _RunReporter(ctx, loop, ctx.reporter)
        result = run_build(
            build_config(ctx, loop),
            reporter=reporter,
            trigger="alert",
            trigger_ref=str(loop.alert_id),
            actor=ACTOR,
            stores=stores,
        )
        run_id = result.run_id
    return _built(ctx, ctx.store.loops.get(loop.id), run_id)


def _built(ctx: LoopContext, loop: LoopRecord, run_id: str) -> LoopRecord | None:
    """The loop after its build run ended: rejected by the build's gate, or on to ours."""
    run = ctx.store.runs.get(run_id)
    fields: dict[str, Any] = {"run_id": run_id, "dataset_version": run.dataset_version}
    if run.status == "rejected":
        why = (run.error or "").removeprefix("gate rejected the candidate: ")
        return ctx.finish(loop, "rejected", GATE_PREFIX + why, **fields)
    if run.status != "succeeded" or run.model_version is None:
        return ctx.finish(
            loop, "failed", f"build run {run_id} ended {run.status}: {run.error}", **fields
        )
    version = int(run.model_version)
    if version == loop.incumbent_version:
        return ctx.finish(
            loop,
            "rejected",
            f"the retrain rebuilt {loop.model_name}:{version}, "
            "the incumbent itself (same bundle): nothing new to release",
            **fields,
        )
    if run.dataset_version:  # the dataset's mark takes over from the loop's
        marked = mark_captures(ctx, loop, run_id, run.dataset_version)
        fields["state"] = {**loop.state, "dataset_captures": marked}
    detail = (
        f"build run {run_id} built {loop.model_name}:{version} on dataset "
        f"{(run.dataset_version or '?')[:12]}"
    )
    return ctx.save(
        loop,
        event={"step": "build", "status": "succeeded", "detail": detail},
        step="gate",
        model_version=version,
        **fields,
    )


def mark_captures(ctx: LoopContext, loop: LoopRecord, run_id: str, dataset_version: str) -> int:
    """Mark the captures ingested by ``run_id`` as used by its dataset (retention keeps
    them), also those the loop had marked; how many were newly marked."""
    from loopline.pipeline import codecs

    for step in reversed(ctx.store.steps.for_run(run_id)):
        ref = (step.outputs or {}).get("records") if step.step == "ingest" else None
        if step.status == "succeeded" and ref and ctx.artifacts.exists(ref["sha256"]):
            records = codecs.decode(ref["codec"], ctx.artifacts.get_bytes(ref["sha256"]))
            paths = records["path"].astype(str)
            ids = [p[len(PREFIX) :] for p in paths if p.startswith(PREFIX)]
            return data.remark(ctx.store, ids, data.loop_marker(loop.id), dataset_version)
    return 0


# -- gate ----------------------------------------------------------------------------------
def gate(ctx: LoopContext, loop: LoopRecord) -> LoopRecord | None:
    """Candidate against what the environment serves now (the incumbent, unless a person
    released another version meanwhile) on the held-out captures; worse by more than
    ``retrain.max_regression``: rejected, production untouched."""
    from loopline.builder.evaluate_registered import score_bundle

    end = parse_time(loop.state.get("holdout_end"), "holdout_end")
    source = captures(
        ctx,
        loop,
        parse_time(loop.state["until"], "until"),
        end + timedelta(microseconds=1) if end is not None else None,
    )
    labels = list(ctx.config.data.labels)
    held = data.holdout_records(source, loop.state.get("holdout", []), labels)
    if held.empty:
        return ctx.finish(
            loop,
            "failed",
            "the held-out captures are gone (purged?); the "
            "candidate cannot be compared with the incumbent",
        )
    against = serving_version(ctx, loop)
    scores: dict[str, Any] = {"n": len(held), "max_regression": ctx.policy.max_regression}
    for role, version in (("candidate", loop.model_version), ("incumbent", against)):
        mv = ctx.store.models.get(loop.model_name, version)
        report, _ = score_bundle(
            ctx.artifacts, source, mv.bundle_sha256, held, labels, reporter=ctx.reporter
        )
        scores[role] = {
            "version": version,
            "accuracy": float(report["accuracy"]),
            "macro_f1": float(report["macro_f1"]),
        }
    cand, inc = scores["candidate"]["accuracy"], scores["incumbent"]["accuracy"]
    scores["passed"] = passed = cand >= inc - ctx.policy.max_regression
    state = {**loop.state, "gate": scores, "gated_against": against}
    summary = (
        f"accuracy on {len(held)} held-out labelled production images: candidate "
        f"{loop.model_name}:{loop.model_version} {cand:.3f}, incumbent "
        f"{loop.model_name}:{against} {inc:.3f}"
    )
    if against != loop.incumbent_version:
        summary += (
            f" (it took {loop.environment}'s traffic after the alert on "
            f"{loop.model_name}:{loop.incumbent_version})"
        )
    if not passed:
        reason = (
            f"{GATE_PREFIX}{summary}; the candidate trails by more than "
            f"{ctx.policy.max_regression:g} (retrain.max_regression)"
        )
        return ctx.finish(loop, "rejected", reason, state=state)
    following = "approval" if loop.action == "approve" else "replica"
    return ctx.save(
        loop,
        event={"step": "gate", "status": "succeeded", "detail": summary, "scores": scores},
        step=following,
        state=state,
    )


def serving_version(ctx: LoopContext, loop: LoopRecord) -> int | None:
    """The stable version the loop's environment serves of its model now (the incumbent
    when it serves none)."""
    dep = ctx.store.deployments.get(loop.environment)
    if dep is not None and dep.model_name == loop.model_name and dep.stable_version is not None:
        return int(dep.stable_version)
    return loop.incumbent_version


# -- approval ------------------------------------------------------------------------------
def approval(ctx: LoopContext, loop: LoopRecord) -> LoopRecord | None:
    """Wait for a person (``loopline approve`` / ``loopline reject``)."""
    if loop.state.get("approved_by"):
        return ctx.save(loop, step="replica")
    ref = f"{loop.model_name}:{loop.model_version}"
    reason = (
        f"{ref} passed the gate; waiting for approval: `loopline approve "
        f"{loop.alert_id}` (or `loopline reject {loop.alert_id} --reason ...`)"
    )
    waiting = ctx.save(
        loop,
        event={"step": "approval", "status": "waiting", "detail": reason},
        status="waiting_approval",
        reason=reason,
    )
    ctx.note(waiting, "waiting_approval", reason)
    return None


def candidate_steps() -> dict[str, StepFn]:
    """The steps that make and judge a candidate, by name (``loop`` adds the release)."""
    return {"dataset": dataset, "build": build, "gate": gate, "approval": approval}

"""Runs a pipeline: cache lookups, artifact I/O, step records, failure and resume.

The runner is handed a metadata store and an artifact store (anything with their methods);
it never imports a driver. A step gets only the config keys it declares; its cache key is the
hash of its code version (its module, what that imports and the Loopline version), those
params, its input digests and any run-time extras; a hit reuses the recorded outputs without
running. Steps only return values: a ``Recorder`` writes what they mean to the store.
"""

from __future__ import annotations

import json
import time
import traceback
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel

from loopline.digest import sha256_bytes
from loopline.errors import LooplineError, PipelineError
from loopline.pipeline import codecs
from loopline.pipeline.ports import BlobStore, RunStore
from loopline.pipeline.step import (
    Pipeline,
    Recorder,
    Reporter,
    SilentReporter,
    Step,
    StepContext,
)


@dataclass
class StepOutcome:
    step: str
    status: str  # succeeded | cached | failed
    seconds: float
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class RunResult:
    run_id: str
    status: str  # succeeded | rejected | failed
    steps: list[StepOutcome]
    values: dict[str, Any]
    reason: str | None = None


def new_run_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def cache_key(
    step: Step, code: str, params: dict[str, Any], inputs: dict[str, str], extra: str
) -> str:
    """The hash that names a step's outputs: same key, same outputs."""
    payload = {
        "step": step.name,
        "code": code,
        "params": params,
        "inputs": inputs,
        "extra": extra,
    }
    return sha256_bytes(_canonical(payload).encode())


class Runner:
    """Executes pipelines against a metadata store and an artifact store."""

    def __init__(
        self,
        store: RunStore,
        artifacts: BlobStore,
        reporter: Reporter | None = None,
        resources: Any = None,
        use_cache: bool = True,
        recorder: Recorder | None = None,
    ) -> None:
        self.recorder = recorder
        self.store = store
        self.artifacts = artifacts
        self.reporter = reporter or SilentReporter()
        self.resources = resources
        self.use_cache = use_cache

    def run(
        self,
        pipeline: Pipeline,
        config: Mapping[str, Any],
        *,
        project: str,
        run_id: str | None = None,
        resume: bool = False,
        trigger: str = "manual",
        trigger_ref: str | None = None,
        git_commit: str | None = None,
    ) -> RunResult:
        """Run (or, with ``resume``, continue) ``pipeline`` on ``config``; returns how it ended.

        ``config`` (JSON-like) is recorded with the run; each step gets its declared keys.
        Raises the step's LooplineError (or PipelineError for anything unexpected) after
        recording the failure, so the caller can report it and the run can be resumed.
        """
        if resume:
            if run_id is None:
                raise PipelineError("resume needs a run id")
            # One atomic claim: of two resumes of one run, only one gets to execute it.
            claim = self.store.runs.claim(run_id)
            previous = claim.run
            run_id = previous.id
            if not claim.won:
                if previous.status == "running":
                    raise PipelineError(
                        f"run {run_id} is already running (pid {previous.pid} on "
                        f"{previous.host}); wait for it to end, then resume it if it failed"
                    )
                raise PipelineError(
                    f"run {run_id} is {previous.status}; only failed or interrupted runs "
                    "can be resumed"
                )
            self.store.audit.record("loopline", "run.resume", run_id)
            # What this run already did is kept even with the cache off: that is resuming.
            done = {s.step: s for s in self.store.steps.for_run(run_id) if s.status == "succeeded"}
        else:
            done = {}
            run_id = run_id or new_run_id()
            self.store.runs.create(
                run_id,
                pipeline=pipeline.name,
                project=project,
                config=dict(config),
                trigger=trigger,
                trigger_ref=trigger_ref,
                git_commit=git_commit,
            )

        refs: dict[str, dict[str, Any]] = {}
        values: dict[str, Any] = {}
        outcomes: list[StepOutcome] = []
        for step in pipeline:
            try:
                outcome = self._run_step(run_id, step, config, refs, values, done)
                if self.recorder is not None:
                    self.recorder.step_done(run_id, step.name, values)
            except BaseException as err:
                reason = _reason(err)
                status = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
                self.store.runs.update(
                    run_id, status=status, error=f"{step.name}: {reason}", finished_at=_now()
                )
                if isinstance(err, LooplineError):
                    raise
                if isinstance(err, Exception):
                    raise PipelineError(f"step {step.name} failed: {reason}") from err
                raise
            outcomes.append(outcome)
            if step.halt is not None:
                halted = step.halt({name: values[name] for name in step.outputs})
                if halted:
                    self.store.runs.update(
                        run_id, status="rejected", error=halted, finished_at=_now()
                    )
                    return RunResult(run_id, "rejected", outcomes, values, halted)
        self.store.runs.update(run_id, status="succeeded", finished_at=_now())
        return RunResult(run_id, "succeeded", outcomes, values)

    # -- one step ------------------------------------------------------------------------
    def _run_step(
        self,
        run_id: str,
        step: Step,
        config: Mapping[str, Any],
        refs: dict[str, dict[str, Any]],
        values: dict[str, Any],
        done: dict[str, Any],
    ) -> StepOutcome:
        selected = step.select_params(config)
        params = _params_json(selected)
        code = step.code_version_for(selected)
        input_digests = {name: refs[name]["sha256"] for name in step.inputs}
        ctx = StepContext(
            run_id=run_id,
            step=step.name,
            reporter=self.reporter,
            resources=self.resources,
            record_trial=lambda number, **f: self.store.trials.record(run_id, number, **f),
        )
        extra = step.cache_extra(ctx, selected) if step.cache_extra is not None else ""
        ctx.cache_extra = extra
        key = cache_key(step, code, params, input_digests, extra)
        common: dict[str, Any] = {
            "cache_key": key,
            "code_version": code,
            "params": params,
            "inputs": {name: refs[name] for name in step.inputs},
        }
        self.reporter.step_started(step.name)

        hit = self.store.steps.find_cached(step.name, key) if self.use_cache else None
        if hit is None and step.name in done and done[step.name].cache_key == key:
            hit = done[step.name]
        if hit is not None and self._outputs_present(hit.outputs, step):
            for name in step.outputs:
                refs[name] = hit.outputs[name]
                values[name] = self._load(hit.outputs[name])
            # Name the run that produced the outputs, not one that itself reused them.
            source = hit.cached_from or hit.run_id
            sid = self.store.steps.start(
                run_id, step.name, cached=True, cached_from=source, **common
            )
            self.store.steps.finish(
                sid,
                status="succeeded",
                outputs=hit.outputs,
                log=f"cached: reused the outputs of run {source}",
                duration_s=0.0,
            )
            self.reporter.step_finished(step.name, "cached", 0.0, f"from run {source}")
            return StepOutcome(step.name, "cached", 0.0, hit.outputs)

        sid = self.store.steps.start(run_id, step.name, cached=False, **common)
        t0 = time.perf_counter()
        try:
            kwargs = {
                name: values[name] if name in values else self._load(refs[name])
                for name in step.inputs
            }
            if selected is not None:
                kwargs["params"] = selected
            result = step.func(ctx, **kwargs)
            produced = _as_outputs(step, result)
            out_refs: dict[str, dict[str, Any]] = {}
            for name, value in produced.items():
                codec, data = codecs.encode(value)
                ref = self.artifacts.put_bytes(data)
                out_refs[name] = {"sha256": ref.sha256, "size": ref.size, "codec": codec}
                refs[name] = out_refs[name]
                values[name] = value
        except BaseException as err:
            seconds = time.perf_counter() - t0
            detail = _reason(err)
            if not isinstance(err, LooplineError):
                detail = "".join(traceback.format_exception(err))[-4000:]
            self.store.steps.finish(sid, status="failed", error=detail, log="\n".join(ctx.lines))
            self.reporter.step_finished(step.name, "failed", seconds, _reason(err))
            raise
        seconds = time.perf_counter() - t0
        self.store.steps.finish(sid, status="succeeded", outputs=out_refs, log="\n".join(ctx.lines))
        self.reporter.step_finished(step.name, "succeeded", seconds)
        return StepOutcome(step.name, "succeeded", seconds, out_refs)

    def _outputs_present(self, outputs: dict[str, Any], step: Step) -> bool:
        return all(
            name in outputs and self.artifacts.exists(outputs[name]["sha256"])
            for name in step.outputs
        )

    def _load(self, ref: dict[str, Any]) -> Any:
        return codecs.decode(ref["codec"], self.artifacts.get_bytes(ref["sha256"]))


def _params_json(selected: Any) -> dict[str, Any]:
    if selected is None:
        return {}
    if isinstance(selected, BaseModel):
        return selected.model_dump(mode="json")
    return dict(selected)


def _as_outputs(step: Step, result: Any) -> dict[str, Any]:
    if len(step.outputs) == 0:
        return {}
    if len(step.outputs) == 1:
        return {step.outputs[0]: result}
    if not isinstance(result, dict) or set(result) != set(step.outputs):
        raise PipelineError(
            f"step {step.name} must return a dict with keys {', '.join(step.outputs)}"
        )
    return result


def _reason(err: BaseException) -> str:
    if isinstance(err, KeyboardInterrupt):
        return "interrupted"
    text = str(err).strip().splitlines()
    return (
        f"{type(err).__name__}: {text[0]}"
        if text and not isinstance(err, LooplineError)
        else (text[0] if text else type(err).__name__)
    )


def _now() -> datetime:
    return datetime.now(UTC)

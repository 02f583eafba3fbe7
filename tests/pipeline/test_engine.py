"""The pipeline engine on toy steps, over a real SQLite metadata store and artifact store."""

from __future__ import annotations

import io
import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from pydantic import BaseModel

from loopline.drivers.artifacts import ArtifactStore
from loopline.drivers.metadata.store import MetadataStore
from loopline.errors import DataSourceError, NotFound, PipelineError
from loopline.pipeline import Pipeline, Runner, RunResult, Step, StepContext, codecs

# What the toy steps did, and switches a test flips to make them fail or change.
CALLS: list[str] = []
STATE: dict[str, Any] = {}
SEEN: dict[str, Any] = {}


@pytest.fixture(autouse=True)
def _reset() -> None:
    CALLS.clear()
    SEEN.clear()
    STATE.clear()
    STATE.update(fail=None, extra="v1", halt_below=0)


class AParams(BaseModel):
    n: int = 3


class BParams(BaseModel):
    k: int = 2
    note: str = ""  # does not change b's output


class CParams(BaseModel):
    tag: str = "x"


def make_numbers(ctx: StepContext, params: AParams) -> dict[str, Any]:
    CALLS.append("a")
    ctx.log(f"making {params.n} numbers")
    return {"n": params.n, "values": list(range(params.n))}


def scale(ctx: StepContext, numbers: dict[str, Any], params: BParams) -> list[int]:
    CALLS.append("b")
    if STATE["fail"] == "loopline":
        raise DataSourceError("b cannot read its source")
    if STATE["fail"] == "unexpected":
        return [1 // 0]
    if STATE["fail"] == "interrupt":
        raise KeyboardInterrupt
    return [v * params.k for v in numbers["values"]]


def report(ctx: StepContext, scaled: list[int], params: CParams) -> dict[str, Any]:
    CALLS.append("c")
    return {"total": sum(scaled), "tag": params.tag}


def _halt_if_small(outputs: dict[str, Any]) -> str | None:
    total = sum(outputs["scaled"])
    return f"total {total} is below {STATE['halt_below']}" if total < STATE["halt_below"] else None


A = Step("a", make_numbers, outputs=("numbers",), params=("a",), params_type=AParams)
B = Step("b", scale, inputs=("numbers",), outputs=("scaled",), params=("b",), params_type=BParams)
C = Step("c", report, inputs=("scaled",), outputs=("report",), params=("c",), params_type=CParams)
CONFIG: dict[str, Any] = {"a": {"n": 3}, "b": {"k": 2, "note": ""}, "c": {"tag": "x"}}


def _with(**sections: dict[str, Any]) -> dict[str, Any]:
    """CONFIG with some sections' keys changed."""
    return {name: {**CONFIG.get(name, {}), **sections.get(name, {})} for name in CONFIG | sections}


@pytest.fixture
def store(tmp_path: Path) -> MetadataStore:
    s = MetadataStore(f"sqlite:///{tmp_path / 'loopline.db'}")
    yield s  # type: ignore[misc]
    s.close()


@pytest.fixture
def artifacts(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(str(tmp_path / "artifacts"))


@pytest.fixture
def runner(store: MetadataStore, artifacts: ArtifactStore) -> Runner:
    return Runner(store, artifacts)


def _run(
    runner: Runner,
    steps: list[Step] | None = None,
    config: dict[str, Any] | None = None,
    **kwargs: Any,
) -> RunResult:
    pipeline = Pipeline("toy", steps if steps is not None else [C, A, B])
    return runner.run(pipeline, config or CONFIG, project="toy", **kwargs)


def _statuses(result: RunResult) -> list[tuple[str, str]]:
    return [(o.step, o.status) for o in result.steps]


# -- the DAG -----------------------------------------------------------------------------
@pytest.mark.parametrize("order", list(itertools.permutations([A, B, C])))
def test_steps_are_ordered_by_their_inputs(order: tuple[Step, ...]) -> None:
    assert [s.name for s in Pipeline("toy", order)] == ["a", "b", "c"]


def test_a_run_executes_in_dependency_order(runner: Runner, store: MetadataStore) -> None:
    result = _run(runner)
    assert CALLS == ["a", "b", "c"]
    assert result.status == "succeeded" and result.reason is None
    assert _statuses(result) == [("a", "succeeded"), ("b", "succeeded"), ("c", "succeeded")]
    assert result.values["report"] == {"total": 6, "tag": "x"}
    run = store.runs.get(result.run_id)
    assert (run.status, run.pipeline, run.project, run.config) == (
        "succeeded",
        "toy",
        "toy",
        CONFIG,
    )
    assert run.finished_at is not None
    steps = store.steps.for_run(result.run_id)
    assert [(s.step, s.status, s.cached) for s in steps] == [
        ("a", "succeeded", False),
        ("b", "succeeded", False),
        ("c", "succeeded", False),
    ]
    assert steps[0].params == {"n": 3} and steps[0].log == "making 3 numbers"
    assert steps[1].inputs["numbers"] == steps[0].outputs["numbers"]
    assert steps[0].outputs["numbers"]["codec"] == "json"


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        (
            [
                Step("x", report, inputs=("y_out",), outputs=("x_out",)),
                Step("y", report, inputs=("x_out",), outputs=("y_out",)),
            ],
            "cycle: x, y",
        ),
        ([B, C], "step b needs 'numbers', which no step produces"),
        ([A, Step("a2", make_numbers, outputs=("numbers",))], "produced by a and a2"),
    ],
)
def test_invalid_dags_are_refused(steps: list[Step], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Pipeline("bad", steps)


# -- caching -----------------------------------------------------------------------------
def test_a_second_run_is_fully_cached(runner: Runner, store: MetadataStore) -> None:
    first = _run(runner)
    CALLS.clear()
    second = _run(runner)
    third = _run(runner)
    assert CALLS == []
    assert second.run_id != first.run_id
    assert _statuses(second) == [("a", "cached"), ("b", "cached"), ("c", "cached")]
    assert second.status == "succeeded"
    assert second.values == first.values
    assert [o.outputs for o in second.steps] == [o.outputs for o in first.steps]
    for result in (second, third):  # lineage names the run that computed the outputs
        steps = store.steps.for_run(result.run_id)
        assert all(s.cached and s.cached_from == first.run_id for s in steps)
        assert steps[0].log == f"cached: reused the outputs of run {first.run_id}"


def test_changing_a_section_reruns_that_step_and_its_dependants(runner: Runner) -> None:
    _run(runner)
    CALLS.clear()
    result = _run(runner, config=_with(b={"k": 3}))
    assert _statuses(result) == [("a", "cached"), ("b", "succeeded"), ("c", "succeeded")]
    assert CALLS == ["b", "c"]
    assert result.values["report"]["total"] == 9
    CALLS.clear()
    result = _run(runner, config=_with(b={"k": 3}, c={"tag": "y"}))
    assert _statuses(result) == [("a", "cached"), ("b", "cached"), ("c", "succeeded")]
    assert CALLS == ["c"]


def test_a_rerun_with_identical_output_keeps_dependants_cached(runner: Runner) -> None:
    _run(runner)
    CALLS.clear()
    result = _run(runner, config=_with(b={"note": "same output"}))
    assert _statuses(result) == [("a", "cached"), ("b", "succeeded"), ("c", "cached")]
    assert CALLS == ["b"]


def test_a_cache_extra_change_reruns_the_step(runner: Runner) -> None:
    extra_b = Step(
        "b",
        scale,
        inputs=("numbers",),
        outputs=("scaled",),
        params=("b",),
        params_type=BParams,
        cache_extra=lambda ctx, params: f"{ctx.step}:{params.k}:{STATE['extra']}",
    )
    steps = [A, extra_b, C]
    _run(runner, steps)
    CALLS.clear()
    assert _statuses(_run(runner, steps))[1] == ("b", "cached")
    STATE["extra"] = "v2"
    result = _run(runner, steps)
    assert _statuses(result) == [("a", "cached"), ("b", "succeeded"), ("c", "cached")]
    assert CALLS == ["b"]


def test_cache_off_reruns_everything(store: MetadataStore, artifacts: ArtifactStore) -> None:
    _run(Runner(store, artifacts))
    CALLS.clear()
    result = _run(Runner(store, artifacts, use_cache=False))
    assert CALLS == ["a", "b", "c"]
    assert {o.status for o in result.steps} == {"succeeded"}


def test_a_lost_artifact_is_recomputed(runner: Runner, artifacts: ArtifactStore) -> None:
    first = _run(runner)
    digest = first.steps[1].outputs["scaled"]["sha256"]
    artifacts.fs.rm(artifacts._path(digest))
    CALLS.clear()
    result = _run(runner)
    assert _statuses(result) == [("a", "cached"), ("b", "succeeded"), ("c", "cached")]
    assert artifacts.exists(digest)


# -- codecs through the engine -----------------------------------------------------------
class ConsumeParams(BaseModel):
    salt: int = 0


def produce(ctx: StepContext) -> dict[str, Any]:
    CALLS.append("produce")
    return {
        "table": pd.DataFrame({"path": ["a.png", "b.png"], "score": [0.5, 1.5]}),
        "arrays": {"x": np.arange(6, dtype=np.float32).reshape(2, 3), "y": np.array(["u", "v"])},
        "blob": b"\x00\x01raw",
        "doc": {"labels": ["car", "van"], "n": np.int64(2), "f": np.float32(0.5)},
    }


def consume(
    ctx: StepContext,
    table: pd.DataFrame,
    arrays: dict[str, np.ndarray],
    blob: bytes,
    doc: dict[str, Any],
    params: ConsumeParams,
) -> dict[str, Any]:
    CALLS.append("consume")
    SEEN.update(table=table, arrays=arrays, blob=blob, doc=doc)
    return {"rows": len(table), "salt": params.salt}


CODEC_STEPS = [
    Step(
        "consume",
        consume,
        inputs=("table", "arrays", "blob", "doc"),
        outputs=("summary",),
        params=("consume",),
        params_type=ConsumeParams,
    ),
    Step("produce", produce, outputs=("table", "arrays", "blob", "doc")),
]


def test_outputs_round_trip_through_codecs(runner: Runner) -> None:
    first = _run(runner, CODEC_STEPS, {"consume": {"salt": 0}})
    codecs_used = {name: ref["codec"] for name, ref in first.steps[0].outputs.items()}
    assert codecs_used == {"table": "parquet", "arrays": "npz", "blob": "bytes", "doc": "json"}
    CALLS.clear()
    result = _run(runner, CODEC_STEPS, {"consume": {"salt": 1}})
    assert _statuses(result) == [("produce", "cached"), ("consume", "succeeded")]
    assert CALLS == ["consume"]
    pd.testing.assert_frame_equal(
        SEEN["table"], pd.DataFrame({"path": ["a.png", "b.png"], "score": [0.5, 1.5]})
    )
    assert set(SEEN["arrays"]) == {"x", "y"}
    np.testing.assert_array_equal(SEEN["arrays"]["x"], np.arange(6).reshape(2, 3))
    assert SEEN["arrays"]["x"].dtype == np.float32
    assert SEEN["arrays"]["y"].tolist() == ["u", "v"]
    assert SEEN["blob"] == b"\x00\x01raw"
    assert SEEN["doc"] == {"labels": ["car", "van"], "n": 2, "f": 0.5}
    assert result.values["summary"] == {"rows": 2, "salt": 1}


def test_codecs_never_unpickle() -> None:
    buf = io.BytesIO()
    np.savez(buf, evil=np.array([{"run": "rm -rf /"}], dtype=object))
    with pytest.raises(ValueError, match="allow_pickle"):
        codecs.decode("npz", buf.getvalue())
    with pytest.raises(TypeError, match="Python objects"):
        codecs.encode({"evil": np.array([object()], dtype=object)})
    with pytest.raises(TypeError, match="set"):
        codecs.encode({1, 2})
    with pytest.raises(ValueError, match="unknown codec 'pickle'"):
        codecs.decode("pickle", b"")


def test_a_step_returning_an_unstorable_value_fails(runner: Runner, store: MetadataStore) -> None:
    bad = Step("bad", lambda ctx: object(), outputs=("thing",))
    with pytest.raises(PipelineError, match="step bad failed: TypeError: a step returned object"):
        _run(runner, [bad])
    wrong_keys = Step("multi", lambda ctx: {"one": 1}, outputs=("one", "two"))
    with pytest.raises(PipelineError, match="must return a dict with keys one, two"):
        _run(runner, [wrong_keys])


# -- failure and resume ------------------------------------------------------------------
def test_a_failing_step_fails_the_run(runner: Runner, store: MetadataStore) -> None:
    STATE["fail"] = "loopline"
    with pytest.raises(DataSourceError, match="b cannot read its source"):
        _run(runner, run_id="run-1")
    assert CALLS == ["a", "b"]
    run = store.runs.get("run-1")
    assert run.status == "failed"
    assert run.error == "b: b cannot read its source"
    steps = store.steps.for_run("run-1")
    assert [(s.step, s.status) for s in steps] == [("a", "succeeded"), ("b", "failed")]
    assert steps[1].error == "b cannot read its source"


@pytest.mark.parametrize("use_cache", [True, False])
def test_resume_continues_from_the_failed_step(
    store: MetadataStore, artifacts: ArtifactStore, use_cache: bool
) -> None:
    runner = Runner(store, artifacts, use_cache=use_cache)
    STATE["fail"] = "loopline"
    with pytest.raises(DataSourceError):
        _run(runner, run_id="run-1")
    STATE["fail"] = None  # the cause is fixed
    CALLS.clear()
    result = _run(runner, run_id="run-1", resume=True)
    assert result.run_id == "run-1" and result.status == "succeeded"
    assert CALLS == ["b", "c"]
    assert _statuses(result) == [("a", "cached"), ("b", "succeeded"), ("c", "succeeded")]
    assert result.values["report"] == {"total": 6, "tag": "x"}
    run = store.runs.get("run-1")
    assert (run.status, run.error) == ("succeeded", None)
    assert [r.id for r in store.runs.recent()] == ["run-1"]
    assert ("run.resume", "run-1") in [(e.action, e.subject) for e in store.audit.recent()]


def test_an_interrupted_run_can_be_resumed(runner: Runner, store: MetadataStore) -> None:
    STATE["fail"] = "interrupt"
    with pytest.raises(KeyboardInterrupt):
        _run(runner, run_id="run-1")
    assert store.runs.get("run-1").status == "interrupted"
    STATE["fail"] = None
    CALLS.clear()
    assert _run(runner, run_id="run-1", resume=True).status == "succeeded"
    assert CALLS == ["b", "c"]


def test_only_failed_or_interrupted_runs_resume(runner: Runner) -> None:
    result = _run(runner)
    with pytest.raises(PipelineError, match="is succeeded; only failed or interrupted"):
        _run(runner, run_id=result.run_id, resume=True)
    with pytest.raises(PipelineError, match="resume needs a run id"):
        _run(runner, resume=True)
    with pytest.raises(NotFound):
        _run(runner, run_id="no-such-run", resume=True)


def test_an_unexpected_exception_becomes_a_pipeline_error(
    runner: Runner, store: MetadataStore
) -> None:
    STATE["fail"] = "unexpected"
    with pytest.raises(PipelineError, match="step b failed: ZeroDivisionError") as info:
        _run(runner, run_id="run-1")
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    run = store.runs.get("run-1")
    assert run.status == "failed"
    assert run.error.startswith("b: ZeroDivisionError")
    step = store.steps.for_run("run-1")[1]
    assert step.status == "failed"
    assert "Traceback (most recent call last)" in step.error
    assert "1 // 0" in step.error and "ZeroDivisionError" in step.error


# -- halting -----------------------------------------------------------------------------
HALTING_B = Step(
    "b",
    scale,
    inputs=("numbers",),
    outputs=("scaled",),
    params=("b",),
    params_type=BParams,
    halt=_halt_if_small,
)


def test_halt_stops_the_pipeline_as_rejected(runner: Runner, store: MetadataStore) -> None:
    STATE["halt_below"] = 100
    for expected_b in ("succeeded", "cached"):  # also when b comes from the cache
        CALLS.clear()
        result = _run(runner, [A, HALTING_B, C])
        assert result.status == "rejected"
        assert result.reason == "total 6 is below 100"
        assert _statuses(result)[-1] == ("b", expected_b)
        assert "c" not in CALLS and "report" not in result.values
        run = store.runs.get(result.run_id)
        assert (run.status, run.error) == ("rejected", "total 6 is below 100")
        assert [s.step for s in store.steps.for_run(result.run_id)] == ["a", "b"]
    STATE["halt_below"] = 0
    CALLS.clear()
    result = _run(runner, [A, HALTING_B, C])
    assert result.status == "succeeded"
    assert CALLS == ["c"]


def test_until_stops_after_the_named_step() -> None:
    from loopline.builder.pipeline import build_pipeline

    full = build_pipeline()
    part = full.until("validate")
    assert [s.name for s in part.steps] == ["ingest", "validate"]
    with pytest.raises(KeyError, match="no step 'nope'"):
        full.until("nope")


# -- declared params ---------------------------------------------------------------------
class BWithN(BaseModel):
    k: int
    note: str
    n: int


def scale_by_n(ctx: StepContext, numbers: dict[str, Any], params: BWithN) -> list[int]:
    CALLS.append("b")
    SEEN["params"] = params
    return [v * params.k * params.n for v in numbers["values"]]


B_WITH_N = Step(
    "b",
    scale_by_n,
    inputs=("numbers",),
    outputs=("scaled",),
    params=("b", "a.n"),
    params_type=BWithN,
)


def test_a_step_gets_only_its_declared_keys(runner: Runner, store: MetadataStore) -> None:
    config = {**CONFIG, "other": {"secret": 1}}
    result = _run(runner, [A, B_WITH_N, C], config)
    assert SEEN["params"] == BWithN(k=2, note="", n=3)
    assert store.steps.for_run(result.run_id)[1].params == {"k": 2, "note": "", "n": 3}
    CALLS.clear()
    # An undeclared key is not in b's key; a declared one is.
    result = _run(runner, [A, B_WITH_N, C], {**config, "other": {"secret": 2}})
    assert CALLS == []
    result = _run(runner, [A, B_WITH_N, C], {**config, "a": {"n": 4}})
    assert _statuses(result) == [("a", "succeeded"), ("b", "succeeded"), ("c", "succeeded")]


def test_undeclared_or_clashing_params_fail_the_run(runner: Runner) -> None:
    missing = Step("a", make_numbers, outputs=("numbers",), params=("a", "nope.x"))
    with pytest.raises(PipelineError, match="step a reads 'nope.x', which the config lacks"):
        _run(runner, [missing])
    clash = Step("a", make_numbers, outputs=("numbers",), params=("a", "b.k", "c.k"))
    with pytest.raises(PipelineError, match="both give 'k'"):
        _run(runner, [clash], {**CONFIG, "c": {"k": 1}})
    typed = Step("a", make_numbers, outputs=("numbers",), params=("a",), params_type=AParams)
    with pytest.raises(PipelineError, match="step a params: n: "):
        _run(runner, [typed], {"a": {"n": "many"}})


# -- the recorder ------------------------------------------------------------------------
class ListRecorder:
    def __init__(self, fail_on: str | None = None) -> None:
        self.seen: list[tuple[str, Any]] = []
        self.fail_on = fail_on

    def step_done(self, run_id: str, step: str, values: Any) -> None:
        if step == self.fail_on:
            raise DataSourceError(f"cannot record {step}")
        self.seen.append((step, dict(values).get("report")))


def test_the_recorder_sees_every_step_fresh_or_cached(
    store: MetadataStore, artifacts: ArtifactStore
) -> None:
    for _ in range(2):  # the second run is fully cached
        recorder = ListRecorder()
        _run(Runner(store, artifacts, recorder=recorder))
        assert recorder.seen == [("a", None), ("b", None), ("c", {"total": 6, "tag": "x"})]


def test_a_recorder_failure_fails_the_run(store: MetadataStore, artifacts: ArtifactStore) -> None:
    runner = Runner(store, artifacts, recorder=ListRecorder(fail_on="b"))
    with pytest.raises(DataSourceError, match="cannot record b"):
        _run(runner, run_id="run-1")
    run = store.runs.get("run-1")
    assert (run.status, run.error) == ("failed", "b: cannot record b")

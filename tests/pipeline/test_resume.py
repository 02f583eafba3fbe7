"""Resuming a run claims it atomically: a second resume of a running run is refused."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from loopline.drivers.artifacts import ArtifactStore
from loopline.drivers.metadata.store import MetadataStore
from loopline.errors import PipelineError
from loopline.pipeline import Pipeline, Runner, Step, StepContext

CALLS: list[str] = []
RELEASE = threading.Event()
STARTED = threading.Event()


def slow(ctx: StepContext) -> int:
    CALLS.append("slow")
    STARTED.set()
    assert RELEASE.wait(timeout=120)
    return 1


SLOW = Step("slow", slow, outputs=("one",))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[MetadataStore]:
    s = MetadataStore(f"sqlite:///{tmp_path / 'loopline.db'}")
    yield s
    s.close()


@pytest.fixture
def runner(store: MetadataStore, tmp_path: Path) -> Runner:
    CALLS.clear()
    RELEASE.clear()
    STARTED.clear()
    return Runner(store, ArtifactStore(str(tmp_path / "artifacts")))


def _resume(runner: Runner, run_id: str) -> Any:
    return runner.run(Pipeline("toy", [SLOW]), {}, project="toy", run_id=run_id, resume=True)


def _failed_run(store: MetadataStore, run_id: str) -> None:
    store.runs.create(run_id, pipeline="toy", project="toy", config={})
    store.runs.update(run_id, status="failed", error="slow: boom")


def test_a_second_resume_of_a_resuming_run_is_refused(runner: Runner, store: MetadataStore) -> None:
    _failed_run(store, "run-1")
    results: list[Any] = []
    first = threading.Thread(target=lambda: results.append(_resume(runner, "run-1")))
    first.start()
    try:
        assert STARTED.wait(timeout=120)  # the first resume is executing its step
        with pytest.raises(PipelineError) as info:
            _resume(runner, "run-1")
    finally:
        RELEASE.set()
        first.join()
    message = str(info.value)
    assert message.startswith("run run-1 is already running (pid ")
    assert f"on {socket.gethostname()})" in message
    assert CALLS == ["slow"]  # the step ran once
    assert [r.status for r in results] == ["succeeded"]
    assert store.runs.get("run-1").status == "succeeded"
    resumes = [e for e in store.audit.recent() if e.action == "run.resume"]
    assert len(resumes) == 1


def test_a_run_running_elsewhere_is_not_resumed(runner: Runner, store: MetadataStore) -> None:
    store.runs.create("run-2", pipeline="toy", project="toy", config={})
    store.runs.update("run-2", pid=4242, host="builder-7.example")
    with pytest.raises(PipelineError, match=r"run-2 is already running \(pid 4242 on builder-7"):
        _resume(runner, "run-2")
    assert CALLS == []
    assert store.runs.get("run-2").host == "builder-7.example"

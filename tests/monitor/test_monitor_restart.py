"""A monitor killed in the middle of a loop, and what it leaves behind.

- A real ``loopline monitor`` process fires ``accuracy-low`` from logged predictions and
  their feedback, starts the retrain and is SIGKILLed during the build; a second monitor
  process takes the loop over once the first one's heartbeat is ``monitor.loop_stale_s``
  old, resumes the build and completes the loop: one loop, one build, one new version.
- A process SIGKILLed while its temporary replica server runs (the replica step of a
  loop) takes the server down with it: the server gets SIGTERM from the kernel
  (``PR_SET_PDEATHSIG``) and stops, workers and all.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from loopline.config import load_config
from loopline.deploy import release
from loopline.deploy.replica_procs import group_members
from loopline.drivers.artifacts import ArtifactStore
from loopline.drivers.metadata.store import MetadataStore
from tests.conftest import TINY_CONFIG
from tests.deploy.conftest import free_port
from tests.monitor.test_loop_e2e import LoopProject, production_images, seed

__all__ = ["production_images"]  # the fixture, shared with test_loop_e2e

STALE_S = 3.0
# The retrain trains long enough to be killed in the middle of it; v1 trains one epoch.
RESTART_CONFIG = """\
monitor:
  owner: qa@example.com
  loop_stale_s: {stale}
  rules:
    - {{name: accuracy-low, metric: accuracy, op: "<", threshold: 0.4, window: 50,
       min_samples: 30, severity: critical, action: retrain}}
  retrain:
    min_new_labels: 40
    holdout_min: 20
    holdout_share: 0.3
    cooldown_s: 0
    strategy: direct
    max_regression: 1.0
    set: ["gate.max_regression=1.0", "train.epochs=6", "train.patience=6"]
environments:
  staging:
    port: {staging_port}
    replica_test: {{rules: ["accuracy >= 0.0"], load_requests: 20, concurrency: 2, replay: 0,
                   timeout_s: 120, max_p95_ms: 600000, max_memory_mb: 4096}}
  production:
    port: {prod_port}
"""


class Monitor:
    """A ``loopline monitor --interval 0.5s --json`` process in the project folder."""

    def __init__(self, root: Path, name: str) -> None:
        self.out, self.err = root / f"{name}.jsonl", root / f"{name}.log"
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "loopline.cli.main", "monitor", "--interval", "0.5s",
                 "--json"],
                cwd=root, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
            )  # fmt: skip

    def check_running(self) -> None:
        assert self.proc.poll() is None, f"the monitor exited: {self.tail()}"

    def tail(self, lines: int = 15) -> str:
        text = self.err.read_text(errors="replace").splitlines()
        return " | ".join(text[-lines:])

    def passes(self) -> list[dict[str, Any]]:
        return [json.loads(ln) for ln in self.out.read_text().splitlines() if ln.strip()]

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def monitors(tmp_path: Path) -> Iterator[Callable[[str], Monitor]]:
    started: list[Monitor] = []

    def start(name: str) -> Monitor:
        started.append(Monitor(tmp_path / "project", name))
        return started[-1]

    yield start
    for m in started:
        m.stop(signal.SIGKILL)


def restart_project(root: Path, lake: Path, production: pd.DataFrame) -> LoopProject:
    """tiny:1 built on the lake and serving production; the monitor section above."""
    from loopline.builder.pipeline import build

    root.mkdir(parents=True, exist_ok=True)
    path = root / "loopline.yaml"
    text = TINY_CONFIG.format(db=f"sqlite:///{root / 'state' / 'loopline.db'}",
                              artifacts=root / "state" / "artifacts", lake=lake)  # fmt: skip
    text += RESTART_CONFIG.format(stale=STALE_S, staging_port=free_port(), prod_port=free_port())
    path.write_text(text)
    cfg = load_config(path)
    assert cfg.monitor.loop_stale_s == STALE_S
    store, artifacts = MetadataStore(cfg.metadata_url()), ArtifactStore(cfg.artifacts_url())
    result = build(cfg, stores=(store, artifacts))
    assert result.status == "succeeded" and result.model is not None
    release.promote(store, "tiny:1", to="production", require_replica_test=False, actor="setup")
    return LoopProject(root, path, cfg, store, artifacts, production)


def wait_for(what: str, ready: Callable[[], Any], monitor: Monitor, limit_s: float = 180) -> Any:
    """Poll ``ready`` until it is true (its value), the monitor ends, or ``limit_s`` passes
    (a bound against hanging, not a measure of speed)."""
    deadline = time.monotonic() + limit_s
    while True:
        value = ready()
        if value:
            return value
        monitor.check_running()
        assert time.monotonic() < deadline, f"{what}: not within {limit_s:g} s; {monitor.tail()}"
        time.sleep(0.05)


@pytest.mark.slow
def test_a_monitor_process_killed_mid_build_is_taken_over_by_the_next_one(
    tmp_path: Path, tiny_lake: Path, production_images: pd.DataFrame,
    monitors: Callable[[str], Monitor],
) -> None:  # fmt: skip
    lp = restart_project(tmp_path / "project", tiny_lake, production_images)
    store = lp.store
    # Production answers "car" to everything: accuracy about 0.2 on labelled captures.
    seed(lp, lp.images(56), lp.images(24, offset=56))

    first = monitors("first")

    def training() -> Any:
        loops = store.loops.list()
        if not loops or loops[0].step != "build" or loops[0].run_id is None:
            return None
        steps = store.steps.for_run(loops[0].run_id)
        return loops[0] if any(s.step == "train" and s.status == "running" for s in steps) else None

    killed = wait_for("the first monitor's loop training its candidate", training, first)
    first.stop(signal.SIGKILL)  # reaped: its pid is gone, its run reads interrupted
    assert first.proc.returncode == -signal.SIGKILL
    alert = store.alerts.get(killed.alert_id)
    assert alert is not None
    assert (alert.rule, alert.state, alert.model_version) == ("accuracy-low", "firing", 1)
    held = store.loops.get(killed.id)
    assert (held.status, held.step, held.attempts) == ("running", "build", 1)
    assert held.owner is not None and held.owner.endswith(f":{first.proc.pid}")
    assert held.run_id is not None and store.runs.get(held.run_id).status == "interrupted"

    second = monitors("second")

    def finished() -> Any:
        loop = store.loops.get(killed.id)
        return loop if loop.status not in ("running", "waiting_approval") else None

    done = wait_for("the second monitor completing the loop", finished, second)

    def reported() -> bool:  # the next pass prints what the loop worker did
        moved = [item for p in second.passes() for item in p["loops"]]
        return any(item.get("status") == done.status for item in moved)

    wait_for("the second monitor reporting the loop's end", reported, second)
    second.stop()
    assert (done.status, done.step) == ("succeeded", "done"), (done.reason, done.timeline)
    assert done.attempts == 2  # two holders: the killed monitor, then the second one
    assert done.owner is None or done.owner.endswith(f":{second.proc.pid}")
    assert [x.id for x in store.loops.list() if x.alert_id == alert.id] == [done.id]
    # One build for the alert, resumed (or, had it not been recorded, re-run): one version.
    runs = [r for r in store.runs.recent(100) if r.trigger_ref == str(alert.id)]
    assert [(r.trigger, r.status) for r in runs] == [("alert", "succeeded")], runs
    assert runs[0].id == done.run_id == killed.run_id and done.model_version == 2
    assert [mv.version for mv in store.models.versions("tiny", include_archived=True)] == [1, 2]
    assert ("build", "resumed") in [(e["step"], e["status"]) for e in done.timeline]
    dep = store.deployments.get("production")
    assert dep is not None
    assert (dep.model_name, dep.stable_version, dep.candidate_version) == ("tiny", 2, None)
    kinds = [e["kind"] for e in store.alerts.events(alert.id)]
    assert (kinds.count("loop.started"), kinds.count("loop.succeeded")) == (1, 1), kinds
    # The first monitor fired the alert and started the loop; the second started none.
    started = [(p["owner"], item["loop_id"]) for m in (first, second) for p in m.passes()
               for item in p["loops"] if item.get("event") == "started"]  # fmt: skip
    assert [loop_id for _, loop_id in started] == [done.id], started
    assert started[0][0].endswith(f":{first.proc.pid}")


# -- the replica server dies with the process that started it ----------------------------------
HOLDER = """
import sys, time
from pathlib import Path
from loopline.config import load_config
from loopline.deploy.preprod import temporary_server
from loopline.drivers.metadata.store import MetadataStore
cfg = load_config(sys.argv[1])
store = MetadataStore(cfg.metadata_url())
with temporary_server(cfg, Path(sys.argv[1]), "staging", store, "tiny", 1, 120.0) as replica:
    print(replica.pids[0], flush=True)
    time.sleep(600)
"""


def test_a_temporary_replica_server_dies_with_the_process_that_started_it(
    tmp_path: Path, tiny_lake: Path
) -> None:
    from tests.deploy.replica_models import constant_onnx, make_replica_project

    rp = make_replica_project(tmp_path / "replica", tiny_lake)
    version = rp.register(constant_onnx("car"))
    store = rp.store()
    release.stage(store, f"tiny:{version}", env="staging")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(rp.config_path)], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    server = 0
    try:
        assert holder.stdout is not None
        line = holder.stdout.readline()  # once the server serves the version
        assert line.strip().isdigit(), (line, holder.poll(), holder.stderr and holder.stderr.read())
        server = int(line)
        assert group_members(server), "the replica server is not running"
        holder.kill()  # SIGKILL: no finally, no _stop: only the kernel can tell the server
        holder.wait(30)
        deadline = time.monotonic() + 30  # a bound against hanging, not a measure of speed
        while group_members(server) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert group_members(server) == [], "the replica server outlived its parent"
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)
        if server:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server, signal.SIGKILL)  # left running: the test failed
        store.close()

"""The story ``loopline demo`` plays, unattended, with the library functions a person uses.

1. ``demo.project.prepare``: the folder, its ``loopline.yaml`` and a day-only lake;
2. ``builder.build``: v1, trained on day images;
3. ``deploy.preprod.deploy``: v1's replica test in staging;
4. ``deploy.release.promote`` v1 to production, and the local target's ``up`` (as
   ``loopline up --env production``) runs its server;
5. ``monitor.service.run`` in a thread (``loopline monitor``), and the simulated CCTV
   traffic with ground truth after a delay (``demo.traffic``);
6. the drift onset: fog and night. From here on the demo only watches: the monitor warns,
   fires the accuracy alert, and its loop retrains, gates, replica-tests and releases v2
   as a canary, which the servers promote;
7. once v2 answers every frame and enough of its answers are labelled, the traffic stops,
   the servers are stopped (``down``), and ``demo.summary`` writes the report and the
   JSON timeline.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loopline.demo.display import LiveDisplay
from loopline.demo.project import MODEL, DemoProject, own_stores, prepare, production_target
from loopline.demo.scenario import Scenario
from loopline.demo.timeline import Clock, Event, Timeline
from loopline.demo.traffic import Traffic
from loopline.demo.watch import MonitorFeed, StoreWatcher
from loopline.errors import LooplineError

if TYPE_CHECKING:
    from rich.console import Console

    from loopline.config import Config
    from loopline.drivers.artifacts import ArtifactStore
    from loopline.drivers.metadata.store import MetadataStore

ACTOR = "loopline demo"
STAGES = [
    "demo project and lake",
    "build v1 on day images",
    "replica test of v1",
    "v1 in production",
    "traffic: day",
    "drift: fog and night",
    "alert: accuracy under 40%",
    "retrain",
    "replica test of v2",
    "canary of v2",
    "v2 serves all traffic",
    "accuracy recovered",
]
# The stage an event moves the story to (events of the loop by their step).
EVENT_STAGES = {"drift": 5, "alert": 6, "canary": 9, "redeploy": 10, "recovered": 11}
LOOP_STAGES = {"dataset": 7, "build": 7, "gate": 7, "replica": 8, "release": 9}


class DemoFailed(LooplineError):
    """The story could not be played to its end (a step failed, or it ran out of time)."""


@dataclass
class DemoRun:
    """Everything the story saw, for ``demo.summary``."""

    scenario: Scenario
    project: DemoProject
    timeline: Timeline
    traffic: Traffic | None
    feed: MonitorFeed | None
    watcher: StoreWatcher | None
    timings: dict[str, float]
    versions: list[int]
    new_version: int | None
    ok: bool
    reason: str | None


def run_demo(
    root: Path, scenario: Scenario, console: Console, *, live: bool | None = None
) -> dict[str, Any]:
    """Play the story in ``root``; write ``timeline.json`` and ``report.html`` there and
    return the JSON timeline (``ok`` false, with ``reason``, when it did not finish)."""
    from loopline.demo.summary import summarize, write

    run = Story(root, scenario, console, live=live).run()
    doc = summarize(run)
    write(doc, run.project.root)
    return doc


@contextlib.contextmanager
def _quiet_alert_log() -> Iterator[None]:
    """The log channel's lines are on the timeline already (as ``notified`` events)."""
    import logging

    log = logging.getLogger("loopline.monitor.alerts")
    handler, saved = logging.NullHandler(), log.propagate
    log.addHandler(handler)
    log.propagate = False
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.propagate = saved


class Story:
    """Plays the scenario in ``root``; ``run`` returns what happened (see ``DemoRun``)."""

    def __init__(
        self, root: Path, scenario: Scenario, console: Console, *, live: bool | None = None
    ) -> None:
        self.root, self.scenario = Path(root), scenario
        self.clock = Clock()
        self.timeline = Timeline(self.clock)
        self.traffic: Traffic | None = None
        self.feed: MonitorFeed | None = None
        self.watcher: StoreWatcher | None = None
        self.display = LiveDisplay(
            console, STAGES, traffic=self._stats, monitor=self._monitor_line, live=live
        )
        self.timeline.listen(self._on_event)
        self.timings: dict[str, float] = {}
        self._stage = -1
        self._new_version: int | None = None

    # -- the story -------------------------------------------------------------------------
    def run(self) -> DemoRun:
        ok, reason = False, None
        project: DemoProject | None = None
        with own_stores(), _quiet_alert_log(), self.display:
            try:
                project = self._setup()
                ok, reason = self._play(project)
            except LooplineError as err:
                reason = str(err)
                self.timeline.mark("error", reason)
            except KeyboardInterrupt:
                reason = "interrupted"
                self.timeline.mark("error", "interrupted (Ctrl-C): stopping everything")
                raise
            finally:
                if project is not None:
                    self._teardown(project)
        if project is None:
            raise DemoFailed(reason or "the demo project could not be prepared")
        self.timings["total_s"] = round(self.clock(), 2)
        return DemoRun(
            self.scenario,
            project,
            self.timeline,
            self.traffic,
            self.feed,
            self.watcher,
            self.timings,
            self.watcher.served if self.watcher is not None else [],
            self._new_version,
            ok,
            reason,
        )

    def _setup(self) -> DemoProject:
        self._to_stage(0)
        started = self.clock()
        project = prepare(
            self.root,
            self.scenario,
            on_lake=lambda n: self.display.activity(f"writing {n} day images"),
        )
        how = "kept from the previous demo" if project.lake_reused else "generated"
        self.timeline.mark(
            "step",
            f"lake of {self.scenario.lake_images} day images {how} in "
            f"{project.lake}; config {project.config_path}",
        )
        self.timings["setup_s"] = round(self.clock() - started, 2)
        return project

    def _play(self, project: DemoProject) -> tuple[bool, str | None]:
        from loopline.drivers.artifacts import ArtifactStore
        from loopline.drivers.metadata.store import MetadataStore

        config = project.config()
        store = MetadataStore(config.metadata_url())
        artifacts = ArtifactStore(config.artifacts_url())
        try:
            version = self._build_v1(config, store, artifacts)
            self._replica_v1(config, store, artifacts, project, version)
            self._production(config, store, project, version)
            return self._watch_the_loop(config, project, store)
        finally:
            store.close()

    def _build_v1(self, config: Config, store: MetadataStore, artifacts: ArtifactStore) -> int:
        from loopline.builder.pipeline import build

        self._to_stage(1)
        started = self.clock()
        result = build(
            config,
            reporter=self.display.reporter("build v1"),
            actor=ACTOR,
            stores=(store, artifacts),
        )
        if result.status != "succeeded" or result.model is None:
            raise DemoFailed(f"the build of v1 ended {result.status}: {result.reason}")
        version = int(result.model["version"])
        acc = (result.model.get("metrics") or {}).get("accuracy")
        self.timings["build_v1_s"] = round(self.clock() - started, 2)
        self.timeline.mark(
            "step",
            f"built {MODEL}:{version} on day images (test accuracy "
            f"{acc:.3f}) in {self.timings['build_v1_s']:.0f} s",
            version=version,
        )
        return version

    def _replica_v1(
        self,
        config: Config,
        store: MetadataStore,
        artifacts: ArtifactStore,
        project: DemoProject,
        version: int,
    ) -> None:
        from loopline.deploy.preprod import deploy

        self._to_stage(2)
        started = self.clock()
        result = deploy(
            config,
            store,
            f"{MODEL}:{version}",
            env="staging",
            actor=ACTOR,
            config_path=project.config_path,
            artifacts=artifacts,
            reporter=self.display.reporter("replica test v1"),
        )
        self.timings["replica_v1_s"] = round(self.clock() - started, 2)
        if not result.passed:
            raise DemoFailed(
                f"{MODEL}:{version} failed its replica test: " + "; ".join(result.record.reasons)
            )
        self.timeline.mark(
            "step",
            f"replica test of {MODEL}:{version} in staging passed in "
            f"{self.timings['replica_v1_s']:.0f} s",
        )

    def _production(
        self, config: Config, store: MetadataStore, project: DemoProject, version: int
    ) -> None:
        from loopline.deploy import release

        self._to_stage(3)
        started = self.clock()
        release.promote(
            store,
            f"{MODEL}:{version}",
            to="production",
            strategy="direct",
            env=config.environment("production"),
            actor=ACTOR,
            reason="loopline demo: the first version",
            replica_envs=release.replica_environments(config, "production"),
        )
        target, ctx = production_target(config, project)
        self.display.activity(f"starting production's server at {project.endpoint}")
        outcome = target.up(ctx)
        if not outcome.ok:
            raise DemoFailed(f"production did not start: {outcome.message}")
        self.timings["production_s"] = round(self.clock() - started, 2)
        self.timeline.mark("step", f"production: {outcome.message}")

    def _watch_the_loop(
        self, config: Config, project: DemoProject, store: MetadataStore
    ) -> tuple[bool, str | None]:
        """Start the monitor and the traffic, then watch until v2 has recovered."""
        from loopline.monitor import service

        s = self.scenario
        self.feed = MonitorFeed(self.timeline, store)
        self.watcher = StoreWatcher(store, self.timeline, "production")
        self.watcher.poll()  # v1's promotion is already on the timeline
        stop = threading.Event()
        monitor = threading.Thread(
            target=service.run,
            name="demo-monitor",
            daemon=True,
            args=(config,),
            kwargs={
                "interval_s": s.monitor_interval_s,
                "stop": stop,
                "on_pass": self.feed.on_pass,
                "owner": ACTOR,
                "reporter": self.display.reporter("retrain"),
            },
        )
        monitor.start()
        self.traffic = Traffic(
            project.endpoint,
            MODEL,
            project.token,
            s.schedule,
            self.clock,
            seed=s.seed,
            cameras=s.cameras,
            rate=s.rate,
            label_delay_s=s.label_delay_s,
            image_size=s.image_size,
            window=s.window,
        )
        self.traffic.start()
        self._to_stage(4)
        self.timeline.mark(
            "traffic",
            f"{s.cameras} cameras send {s.rate:g} frames/s to "
            f"{project.endpoint}; labels follow {s.label_delay_s:g} s later",
        )
        try:
            return self._until_recovered(self.traffic, self.watcher)
        finally:
            self.display.activity("stopping the traffic and the monitor")
            self.traffic.stop()
            stop.set()
            monitor.join(60)
            self.timings["traffic_s"] = round(self.traffic.traffic_seconds(), 2)

    def _until_recovered(self, traffic: Traffic, watcher: StoreWatcher) -> tuple[bool, str | None]:
        s = self.scenario
        onset = traffic.onset_t
        drifted, since = False, None
        ended_at: float | None = None
        while True:
            time.sleep(0.25)
            if not drifted and onset is not None and self.clock() >= onset:
                drifted = True
                self.timeline.mark("drift", "drift onset: fog and night from now on", t=onset)
            watcher.poll()
            rec = watcher.retrain_loop()
            if rec is not None:
                self.display.activity(
                    f"loop {rec.id}: {rec.step}, {rec.status}"
                    + (f": {rec.reason}" if rec.reason else "")
                )
                if rec.model_version is not None:
                    self._new_version = rec.model_version
                if rec.status in ("rejected", "failed") and ended_at is None:
                    ended_at = self.clock()
                    self.timeline.mark("error", f"the loop ended {rec.status}: {rec.reason}")
            if ended_at is not None and self.clock() - ended_at > 3.0:
                return False, f"the retrain loop ended {rec.status if rec else '?'}"
            if since is None and self._new_version is not None:
                since = self._serving_all(traffic, watcher, self._new_version)
                if since is not None:
                    self.timeline.mark(
                        "redeploy", f"v{self._new_version} answers all production traffic", t=since
                    )
            if since is not None:
                n = sum(1 for x in traffic.log.copy() if x.t >= since and x.labelled_t)
                if n >= s.recovery_labels:
                    self.timeline.mark(
                        "recovered",
                        f"{n} labelled answers of v{self._new_version} since it took all traffic",
                    )
                    return True, None
            if traffic.traffic_seconds() > s.max_traffic_s:
                return False, f"the story did not end within {s.max_traffic_s:g} s of traffic"

    @staticmethod
    def _serving_all(traffic: Traffic, watcher: StoreWatcher, version: int) -> float | None:
        """When ``version`` took every frame: promoted, and the last 30 answers are its."""
        from loopline.demo.figures import serving_all_since

        dep = watcher.deployment()
        if dep is None or dep.stable_version != version or dep.candidate_version is not None:
            return None
        samples = traffic.log.copy()
        if len(samples) < 30 or any(x.version != version for x in samples[-30:]):
            return None
        return serving_all_since(samples, version)

    def _teardown(self, project: DemoProject) -> None:
        """Stop production's server (``loopline down --env production``)."""
        try:
            config = project.config()
            target, ctx = production_target(config, project)
            outcome = target.down(ctx)
            self.timeline.mark("step", outcome.message)
        except LooplineError as err:
            self.timeline.mark("error", f"stopping production: {err}")

    # -- display ---------------------------------------------------------------------------
    def _on_event(self, e: Event) -> None:
        self.display.event(e)
        stage = EVENT_STAGES.get(e.kind)
        if e.kind == "loop":
            stage = LOOP_STAGES.get(str(e.data.get("step")))
        if stage is not None:
            self._to_stage(stage)

    def _to_stage(self, index: int) -> None:
        if index > self._stage:
            self._stage = index
            self.display.stage(STAGES[index])

    def _stats(self) -> Any:
        return self.traffic.log.stats() if self.traffic is not None else None

    def _monitor_line(self) -> str:
        if self.feed is None or self.traffic is None:
            return ""
        return self.feed.line(list(self.traffic.log.stats().versions))

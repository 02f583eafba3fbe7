"""Releases against a real server on loopback, most of them under load from 32 clients.

The server is ``python -m loopline.deploy.server --env ENV`` in a subprocess; releases
are the library calls the CLI and the loop make (``release.promote``, ``rollback``), which
only change the store; the server follows within its reconcile interval (0.2 s here). The
models are tiny real ONNX graphs (``tests/deploy/models.py``): two good ones that answer
the same, one that always answers ``bus``, one that fails in ONNX Runtime on every run.
Waits are generous conditions, never timing assertions.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from loopline.deploy import canary, release
from loopline.deploy.router import sticky_bucket
from tests.deploy.conftest import TOKEN
from tests.deploy.models import (
    EnvServer,
    Load,
    ReleaseProject,
    env_server,
    env_yaml,
    images,
    make_release_project,
    ready,
    wait_for,
)

pytestmark = pytest.mark.slow

GUARDED: dict[str, Any] = {"auto_promote": False, "min_requests": 100_000}  # never promoted
ENVIRONMENTS = (
    env_yaml("direct")
    + env_yaml("accuracy", min_requests=60)  # the default policy: promotion needs labels
    + env_yaml("errors", **GUARDED)
    + env_yaml("promote", min_requests=60, needs_labels=False)
    + env_yaml("shadow", **GUARDED)
    + env_yaml("sticky", **GUARDED)
)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> ReleaseProject:
    return make_release_project(tmp_path_factory.mktemp("release"), ENVIRONMENTS)


@pytest.fixture
def store(project: ReleaseProject) -> Iterator[Any]:
    s = project.store()
    yield s
    s.close()


def serving(project: ReleaseProject, store: Any, env: str, *args: str) -> Any:
    """The environment serving the good model, and a ready server for it."""
    release.promote(store, f"vehicles:{project.versions['good']}", to=env)
    return env_server(project, env, *args)


def wait_ready(server: EnvServer) -> None:
    wait_for(lambda: ready(server), 90, what="the server ready", alive=server.proc)


def last_event(store: Any, env: str, action: str) -> dict[str, Any] | None:
    events = [e for e in store.deployments.history(env, limit=5) if e["action"] == action]
    return events[0] if events else None


def promote_and_roll_back_under_load(project: ReleaseProject, store: Any, env: str,
                                     *args: str, replicas: int = 1) -> list[Any]:  # fmt: skip
    good, good2 = project.versions["good"], project.versions["good2"]
    with serving(project, store, env, *args) as server:
        wait_ready(server)
        with Load(server.url, clients=32) as load:
            wait_for(lambda: len(load.answers) >= 200, what="answers before the release")
            since = time.monotonic()
            release.promote(store, f"vehicles:{good2}", to=env, reason="under load")
            wait_for(lambda: load.settled_on(good2, since), what=f"answers from {good2}")
            since = time.monotonic()
            release.rollback(store, "vehicles", env=env, reason="under load")
            wait_for(lambda: load.settled_on(good, since), what=f"answers from {good} again")
            reporting = wait_for(
                lambda: (
                    len(r := store.deployments.replicas(env, seen_within_s=5)) >= replicas and r
                ),
                what=f"{replicas} replicas reporting",
            )
        assert load.failures() == [], load.failures()[:3]
        assert {a.version for a in load.answers} == {good, good2}
        assert all(a.label == a.truth for a in load.answers)  # right answers throughout
    assert store.deployments.replicas(env) == []  # each process signed off as it stopped
    assert {r.generation for r in reporting} == {store.deployments.get(env).generation}
    return reporting


def test_direct_promote_and_rollback_under_load_fail_no_request(
    project: ReleaseProject, store: Any
) -> None:
    promote_and_roll_back_under_load(project, store, "direct")
    actions = [e["action"] for e in store.deployments.history("direct", limit=3)]
    assert actions == ["rollback", "promote", "promote"]


def test_two_workers_on_postgresql_each_follow_the_release(
    tmp_path: Path, pg_schema_url: str
) -> None:
    project = make_release_project(tmp_path / "pg", env_yaml("pg", workers=2), pg_schema_url)
    store = project.store()
    try:
        reporting = promote_and_roll_back_under_load(project, store, "pg", replicas=2)
        assert len({r.pid for r in reporting}) == 2  # each worker follows on its own
    finally:
        store.close()


def canary_under_load(
    project: ReleaseProject, store: Any, env: str, kind: str, *, feedback: bool = False
) -> tuple[Load, dict[str, Any]]:
    """A canary of ``kind`` under load until its verdict; the load and the history event."""
    version = project.versions[kind]
    with serving(project, store, env) as server:
        wait_ready(server)
        with Load(server.url, clients=32, feedback=feedback) as load:
            wait_for(lambda: len(load.answers) >= 100, what="answers before the canary")
            release.promote(store, f"vehicles:{version}", to=env, strategy="canary", share=0.5)
            event = wait_for(
                lambda: (
                    last_event(store, env, "auto-rollback")
                    or last_event(store, env, "auto-promote")
                ),
                180,
                what=f"a verdict on the canary of {kind}",
            )
            after = time.monotonic()
            stable = store.deployments.get(env).stable_version
            wait_for(lambda: load.settled_on(stable, after), what="answers from the stable one")
        assert load.failures() == [], load.failures()[:3]
        assert load.feedback_errors == []
        return load, event


def test_a_canary_answering_one_class_is_rolled_back_once_feedback_arrives(
    project: ReleaseProject, store: Any
) -> None:
    load, event = canary_under_load(project, store, "accuracy", "constant", feedback=True)
    constant = project.versions["constant"]
    assert event["action"] == "auto-rollback" and event["actor"] == "loopline (canary)"
    assert f"vehicles:{constant}: accuracy" in event["reason"], event["reason"]
    assert any(a.version == constant for a in load.answers)  # it did answer, then went
    dep = store.deployments.get("accuracy")
    assert dep.stable_version == project.versions["good"] and dep.candidate_version is None


def test_a_canary_that_fails_is_rolled_back_on_error_rate_and_no_client_sees_it(
    project: ReleaseProject, store: Any
) -> None:
    load, event = canary_under_load(project, store, "errors", "failing")
    assert event["action"] == "auto-rollback" and "error rate" in event["reason"]
    assert {a.version for a in load.answers} == {project.versions["good"]}  # fallbacks


def test_a_healthy_canary_is_promoted_after_its_requests(
    project: ReleaseProject, store: Any
) -> None:
    load, event = canary_under_load(project, store, "promote", "good2")
    good2 = project.versions["good2"]
    assert event["action"] == "auto-promote" and "healthy after" in event["reason"]
    dep = store.deployments.get("promote")
    assert (dep.stable_version, dep.previous_version) == (good2, project.versions["good"])
    assert load.answers[-1].version == good2


def ask_each(server: EnvServer, pngs: list[tuple[str, bytes]]) -> list[dict[str, Any]]:
    out = []
    for i, (_, png) in enumerate(pngs):
        r = httpx.post(f"{server.url}/v1/models/vehicles/predict", content=png,
                       params={"camera_id": f"cam-{i % 4}"},
                       headers={"Content-Type": "image/png"}, timeout=30)  # fmt: skip
        assert r.status_code == 200, r.text
        out.append(r.json())
    return out


def deployment_seen(server: EnvServer) -> dict[str, Any]:
    info = httpx.get(f"{server.url}/v1/models/vehicles", timeout=10).json()
    return dict(info["deployment"])


def flushed_rows(server: EnvServer, store: Any, env: str) -> list[Any]:
    r = httpx.post(f"{server.url}/v1/admin/flush", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200, r.text
    return [p for p in store.predictions.find(model_name="vehicles") if p.environment == env]


def test_shadow_reports_agreement_and_never_changes_an_answer(
    project: ReleaseProject, store: Any
) -> None:
    constant, good = project.versions["constant"], project.versions["good"]
    pngs = images(40)
    with serving(project, store, "shadow") as server:
        wait_ready(server)
        alone = ask_each(server, pngs)
        state = release.promote(store, f"vehicles:{constant}", to="shadow", strategy="shadow")
        wait_for(lambda: deployment_seen(server)["strategy"] == "shadow", what="the shadow on")
        shadowed = ask_each(server, pngs)

        def strip(answers: list[dict[str, Any]]) -> list[Any]:
            return [
                {k: v for k, v in a["predictions"][0].items() if k != "prediction_id"}
                for a in answers
            ]

        assert strip(shadowed) == strip(alone)  # identical, probabilities included
        assert {a["model_version"] for a in shadowed} == {good}
        bus = sum(a["predictions"][0]["label"] == "bus" for a in alone)
        report = wait_for(
            lambda: (r := canary.shadow_report(store, state))["compared"] >= 40 and r,
            what="the shadow compared",
        )
        assert (report["compared"], report["agreed"]) == (40, bus)
        assert report["agreement"] == bus / 40 and report["shadow_errors"] == 0
        assert report["candidate_p95_ms"] is not None
        rows = [p for p in flushed_rows(server, store, "shadow")
                if p.deployment_generation == state.generation]  # fmt: skip
    shadow = [p for p in rows if p.variant == "shadow"]
    stable = [p for p in rows if p.variant == "stable"]
    assert len(shadow) == len(stable) == 40
    assert {p.model_version for p in shadow} == {constant} and {p.label for p in shadow} == {"bus"}
    assert {p.model_version for p in stable} == {good}
    ids = {a["predictions"][0]["prediction_id"] for a in shadowed}
    assert {p.id for p in stable} == ids  # the answers' rows; the shadow's have their own ids
    assert sorted(p.camera_id or "" for p in stable) == sorted(f"cam-{i % 4}" for i in range(40))


def test_a_canary_is_sticky_per_camera_and_its_rows_say_who_answered(
    project: ReleaseProject, store: Any
) -> None:
    good, good2 = project.versions["good"], project.versions["good2"]
    with serving(project, store, "sticky") as server:
        wait_ready(server)
        state = release.promote(store, f"vehicles:{good2}", to="sticky", strategy="canary",
                                share=0.5)  # fmt: skip
        wait_for(lambda: deployment_seen(server)["strategy"] == "canary", what="the canary on")
        shown = deployment_seen(server)
        assert (shown["stable"], shown["candidate"], shown["share"]) == (good, good2, 0.5)
        assert shown["generation"] == state.generation and shown["environment"] == "sticky"
        by_camera: dict[str, set[int]] = {}
        pngs = images(5)
        with httpx.Client(base_url=server.url, timeout=30) as client:
            for camera in (f"gate-{i}" for i in range(24)):
                for _, png in pngs:
                    r = client.post("/v1/models/vehicles/predict", content=png,
                                    params={"camera_id": camera},
                                    headers={"Content-Type": "image/png"})  # fmt: skip
                    assert r.status_code == 200, r.text
                    by_camera.setdefault(camera, set()).add(r.json()["model_version"])
        rows = [p for p in flushed_rows(server, store, "sticky")
                if p.deployment_generation == state.generation]  # fmt: skip
    assert all(len(v) == 1 for v in by_camera.values()), by_camera
    for camera, (version,) in by_camera.items():
        assert (version == good2) == (sticky_bucket(camera) < 2**63)
    assert {v for (v,) in by_camera.values()} == {good, good2}
    assert len(rows) == 24 * 5
    for p in rows:
        (version,) = by_camera[p.camera_id]
        assert p.model_version == version
        assert p.variant == ("canary" if version == good2 else "stable")
        assert p.environment == "sticky" and p.request_metadata == {"camera_id": p.camera_id}

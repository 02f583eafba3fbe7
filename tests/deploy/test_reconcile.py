"""The reconciler converges a server process on its environment's deployment.

Each test builds the real app of ``--env`` (``create_env_app``) over a real store (SQLite
and PostgreSQL) and artifact store holding tiny real models, and drives its reconciler one
interval at a time (``step``) instead of in its thread, so that every state in between can
be looked at. The router is called as the endpoints call it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from loopline.config import load_config
from loopline.deploy import release
from loopline.deploy.reconcile import RETIRE_AFTER_S, Reconciler
from loopline.deploy.router import NotReady, Router
from loopline.deploy.server import create_env_app
from loopline.deploy.settings import ServeSettings
from loopline.drivers.metadata.store import MetadataStore
from tests.deploy.conftest import TOKEN
from tests.deploy.models import ReleaseProject, env_yaml, images, make_release_project

PNGS = images(40)


@dataclass
class Replica:
    project: ReleaseProject
    store: MetadataStore
    app: Any

    @property
    def reconciler(self) -> Reconciler:
        return self.app.state.reconciler  # type: ignore[no-any-return]

    @property
    def router(self) -> Router:
        return self.app.state.loopline.router  # type: ignore[no-any-return]

    def v(self, kind: str) -> int:
        return self.project.versions[kind]

    def versions_answering(self, n: int = 20) -> list[int]:
        async def ask() -> list[int]:
            done = await asyncio.gather(*(self.router.submit(images=[png]) for _, png in PNGS[:n]))
            return [r.served.version for r in done]

        return asyncio.run(ask())


@pytest.fixture
def replica(tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Replica]:
    monkeypatch.setenv("LOOPLINE_TEST_RELEASE_TOKEN", TOKEN)
    project = make_release_project(
        tmp_path / "project",
        env_yaml("prod", auto_promote=False, min_requests=1000),
        metadata_url=db_url,
    )
    store = project.store()
    env = load_config(project.config).environment("prod")
    settings = ServeSettings(workers=1, token=TOKEN, flush_interval_s=0.2)
    app = create_env_app("prod", env, settings, store, project.artifacts_url(),
                         spill_dir=tmp_path)  # fmt: skip
    made = Replica(project, store, app)
    made.app.state.loopline.accepting = True
    try:
        yield made
    finally:
        made.reconciler.stop()
        store.close()


def test_not_ready_until_promoted_then_follows_promote_and_rollback(replica: Replica) -> None:
    state, store, rec = replica.app.state.loopline, replica.store, replica.reconciler
    rec.step()
    assert not state.ready
    with pytest.raises(NotReady, match=r"environment prod .*`loopline promote NAME:VERSION"):
        replica.versions_answering(1)

    release.promote(store, f"vehicles:{replica.v('good')}", to="prod")
    rec.step()
    assert state.ready and set(replica.versions_answering()) == {replica.v("good")}
    (row,) = store.deployments.replicas("prod")
    assert (row.replica_id, row.generation, row.versions, row.status) == (
        rec.replica_id, 1, [replica.v("good")], "ok"
    )  # fmt: skip
    assert store.deployments.get("prod").status == "healthy"
    rec.step()  # the counters of the requests above reach the store
    (row,) = store.deployments.replicas("prod")
    assert row.stats["versions"][str(replica.v("good"))]["requests"] == 20

    first = rec.router.table.stable
    release.promote(store, f"vehicles:{replica.v('good2')}", to="prod")
    rec.step()
    assert set(replica.versions_answering()) == {replica.v("good2")}
    assert first is not None and first.retired and first.batcher.running  # stops a moment later
    time.sleep(RETIRE_AFTER_S + 0.1)
    rec.step()
    assert not first.batcher.running

    release.rollback(store, "vehicles", env="prod")
    rec.step()
    assert set(replica.versions_answering()) == {replica.v("good")}
    assert replica.router.table.generation == 3
    info = replica.router.table.deployment
    assert info is not None and (info["stable"], info["generation"]) == (replica.v("good"), 3)


def test_a_version_that_cannot_load_leaves_the_current_one_serving(replica: Replica) -> None:
    store, rec = replica.store, replica.reconciler
    release.promote(store, f"vehicles:{replica.v('good')}", to="prod")
    rec.step()
    # A registered version whose stored bundle was tampered with after registration.
    digest = store.models.get("vehicles", replica.v("constant")).bundle_sha256
    stored = next(Path(replica.project.artifacts_url()).rglob(digest))
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))
    release.promote(store, f"vehicles:{replica.v('constant')}", to="prod")
    rec.step()
    assert set(replica.versions_answering()) == {replica.v("good")}  # still serving
    (row,) = store.deployments.replicas("prod")
    assert row.status == "error" and row.generation == 1
    assert row.error and f"cannot load vehicles:{replica.v('constant')}" in row.error
    assert "refusing to serve" in row.error
    assert store.deployments.get("prod").status == "degraded"
    rec.step()  # tried again, still failing, still serving
    assert set(replica.versions_answering()) == {replica.v("good")}

    release.promote(store, f"vehicles:{replica.v('good2')}", to="prod")  # the way out
    rec.step()
    assert set(replica.versions_answering()) == {replica.v("good2")}
    (row,) = store.deployments.replicas("prod")
    assert row.status == "ok" and row.error is None and row.generation == 3


def test_a_store_outage_never_stops_serving(replica: Replica) -> None:
    store, rec = replica.store, replica.reconciler
    release.promote(store, f"vehicles:{replica.v('good')}", to="prod")
    rec.step()
    # A store nothing listens on (a real connection refused, no fake).
    down = MetadataStore("postgresql+psycopg://loopline@127.0.0.1:9/none", migrate=False)
    rec.store = down
    try:
        rec.step()
        rec.step()
        assert set(replica.versions_answering()) == {replica.v("good")}
    finally:
        rec.store = store
        down.close()
    release.promote(store, f"vehicles:{replica.v('good2')}", to="prod")
    rec.step()
    assert set(replica.versions_answering()) == {replica.v("good2")}


def test_a_failing_canary_is_rolled_back_on_its_error_rate(replica: Replica) -> None:
    store, rec = replica.store, replica.reconciler
    release.promote(store, f"vehicles:{replica.v('good')}", to="prod")
    failing = replica.v("failing")
    release.promote(store, f"vehicles:{failing}", to="prod", strategy="canary", share=0.5)
    rec.step()
    assert replica.router.table.strategy == "canary"
    for _ in range(3):  # every answer comes from the stable version
        assert set(replica.versions_answering(40)) == {replica.v("good")}
    stats = replica.router.table.stats[failing]
    assert stats.errors >= 20 and stats.fallbacks == stats.errors
    rec.step()  # reports the counters, then judges the canary
    dep = store.deployments.get("prod")
    assert dep.candidate_version is None and dep.stable_version == replica.v("good")
    last = store.deployments.history("prod", limit=1)[0]
    assert last["action"] == "auto-rollback" and "error rate" in last["reason"]
    rec.step()
    assert replica.router.table.strategy == "direct"
    assert replica.router.table.versions == [replica.v("good")]


# -- the command line and a real process --------------------------------------------------
def test_the_sources_are_exclusive_and_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from loopline.deploy.server import main

    monkeypatch.chdir(tmp_path)
    config = tmp_path / "loopline.yaml"
    config.write_text("project: p\n")
    for argv, words in [
        (["vehicles:1", "--env", "production"], "give exactly one of MODEL"),
        (["--bundle", "b.tar", "--env", "production"], "give exactly one of MODEL"),
        ([], "give exactly one of MODEL"),
        (["--env", "nosuch"], "no environment 'nosuch' in the config; configured: staging"),
    ]:
        assert main([*argv, "--config", str(config)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and words in err and err.count("\n") == 1, err


def test_a_bare_bundle_without_an_identity_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from loopline.bundle import write_bundle
    from loopline.deploy.server import main
    from tests.deploy.conftest import bundle_files
    from tests.deploy.models import SIZE, good_model

    monkeypatch.chdir(tmp_path)  # no project here, no store to look the bundle up in
    monkeypatch.delenv("LOOPLINE_MODEL_VERSION", raising=False)
    monkeypatch.delenv("LOOPLINE_DB_URL", raising=False)
    tar = tmp_path / "bundle.tar"
    write_bundle(bundle_files(good_model(), size=SIZE), tar)
    assert main(["--bundle", str(tar), "--no-log", "--port", "0"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot tell which registered version bundle" in err
    assert "--model-version N (or LOOPLINE_MODEL_VERSION=N)" in err


def test_a_served_environment_is_alive_not_ready_until_a_promotion(tmp_path: Path) -> None:
    import httpx
    import numpy as np

    from tests.deploy.models import SIZE, env_server, ready, wait_for

    project = make_release_project(tmp_path / "p", env_yaml("live"))
    with env_server(project, "live") as server:
        r = httpx.get(server.url + "/v2/health/ready")
        assert r.status_code == 503 and "loopline promote NAME:VERSION --to live" in r.text
        r = httpx.post(server.url + "/v1/models/vehicles/predict", content=PNGS[0][1],
                       headers={"Content-Type": "image/png"})  # fmt: skip
        assert r.status_code == 503 and r.headers["Retry-After"] == "1"
        assert r.json()["error"].startswith("environment live has no model deployed yet")
        store = project.store()
        try:
            good = project.versions["good"]
            release.promote(store, f"vehicles:{good}", to="live")
            wait_for(lambda: ready(server), what="ready after the promotion", alive=server.proc)
        finally:
            store.close()
        r = httpx.post(server.url + "/v1/models/vehicles/predict", content=PNGS[1][1],
                       headers={"Content-Type": "image/png"})  # fmt: skip
        assert r.status_code == 200 and r.json()["model_version"] == good  # never version 0
        assert r.json()["predictions"][0]["label"] == PNGS[1][0]
        x = np.full((1, 3, SIZE, SIZE), 40.0, dtype=np.float32)
        x[0, 1] = 220.0  # green: a van
        body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                            "data": x.reshape(-1).tolist()}],
                "outputs": [{"name": "logits", "parameters": {"classification": 1}}]}  # fmt: skip
        r = httpx.post(server.url + f"/v2/models/vehicles/versions/{good}/infer", json=body)
        assert r.status_code == 200, r.text
        assert (
            r.json()["model_version"] == str(good) and ":van" in r.json()["outputs"][0]["data"][0]
        )
        r = httpx.post(server.url + "/v2/models/vehicles/versions/99/infer", json=body)
        assert r.status_code == 404 and f"this server serves version {good}" in r.text
        metrics = httpx.get(server.url + "/metrics").text
        assert f'loopline_batch_size_count{{model="vehicles",version="{good}"}}' in metrics

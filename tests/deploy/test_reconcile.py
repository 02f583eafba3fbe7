"""The reconciler converges a server process on its environment's deployment.

Each test builds the real app of ``--env`` (``create_env_app``) over a real store (SQLite
and PostgreSQL) and artifact store holding tiny real models, and drives its reconciler one
interval at a time (``step``) instead of in its thread, so that every state in between can
be looked at. The router is called as the endpoints call it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from loopline.config import load_config
from loopline.deploy import release
from loopline.deploy.reconcile import CANDIDATE_LOAD_ATTEMPTS, RETIRE_AFTER_S, Reconciler
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
    for _ in range(CANDIDATE_LOAD_ATTEMPTS + 1):  # tried again, still failing, still serving
        rec.step()
    assert set(replica.versions_answering()) == {replica.v("good")}
    dep = store.deployments.get("prod")  # a stable version is never rolled back by a replica
    assert (dep.generation, dep.stable_version, dep.status) == (
        2,
        replica.v("constant"),
        "degraded",
    )

    release.promote(store, f"vehicles:{replica.v('good2')}", to="prod")  # the way out
    rec.step()
    assert set(replica.versions_answering()) == {replica.v("good2")}
    (row,) = store.deployments.replicas("prod")
    assert row.status == "ok" and row.error is None and row.generation == 3


def tamper(project: ReleaseProject, store: MetadataStore, version: int) -> None:
    """Flip one byte of ``version``'s stored bundle, after its registration."""
    digest = store.models.get("vehicles", version).bundle_sha256
    stored = next(Path(project.artifacts_url()).rglob(digest))
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))


@pytest.mark.parametrize("strategy", ["canary", "shadow"])
def test_a_candidate_that_cannot_load_is_rolled_back_after_a_few_tries(
    replica: Replica, strategy: str
) -> None:
    store, rec = replica.store, replica.reconciler
    good, broken = replica.v("good"), replica.v("constant")
    release.promote(store, f"vehicles:{good}", to="prod")
    rec.step()
    tamper(replica.project, store, broken)
    release.promote(store, f"vehicles:{broken}", to="prod", strategy=strategy, share=0.5)
    for _ in range(CANDIDATE_LOAD_ATTEMPTS - 1):  # not judged, since it serves nothing
        rec.step()
        assert set(replica.versions_answering()) == {good}
    dep = store.deployments.get("prod")
    assert (dep.generation, dep.candidate_version, dep.status) == (2, broken, "degraded")

    rec.step()  # one failure too many: the candidate goes, the stable version stays
    dep = store.deployments.get("prod")
    assert (dep.generation, dep.stable_version, dep.candidate_version, dep.strategy) == (
        3, good, None, "direct"
    )  # fmt: skip
    assert (dep.candidate_share, dep.candidate_since, dep.status) == (0.0, None, "healthy")
    last = store.deployments.history("prod", limit=1)[0]
    assert (last["action"], last["actor"]) == ("auto-rollback", "loopline (canary)")
    assert last["reason"].startswith(f"vehicles:{broken} cannot be loaded: refusing to serve")
    assert replica.router.table.generation == 3 and replica.router.table.versions == [good]
    assert set(replica.versions_answering()) == {good}
    rec.step()
    (row,) = store.deployments.replicas("prod")
    assert (row.generation, row.status, row.error) == (3, "ok", None)


def test_a_candidate_rollback_is_compare_and_set(replica: Replica) -> None:
    """A person's change that came first wins: the replica's rollback is dropped."""
    store, rec = replica.store, replica.reconciler
    good, broken = replica.v("good"), replica.v("constant")
    release.promote(store, f"vehicles:{good}", to="prod")
    rec.step()
    tamper(replica.project, store, broken)
    release.promote(store, f"vehicles:{broken}", to="prod", strategy="canary", share=0.5)
    for _ in range(CANDIDATE_LOAD_ATTEMPTS - 1):
        rec.step()
    state = store.deployments.get("prod")
    release.promote(store, f"vehicles:{replica.v('good2')}", to="prod")  # meanwhile
    rec._candidate_failed(state, "refusing to serve")  # the third failure, on generation 2
    assert [e["action"] for e in store.deployments.history("prod", limit=2)] == [
        "promote", "canary"
    ]  # fmt: skip
    dep = store.deployments.get("prod")
    assert (dep.generation, dep.stable_version) == (3, replica.v("good2"))
    rec.step()
    assert set(replica.versions_answering()) == {replica.v("good2")}


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


# -- a store that is down when the server starts ------------------------------------------
class Forward:
    """A TCP forwarder from a free loopback port to PostgreSQL that listens only once
    started: until then a connection to ``url`` is refused, as when the server is down."""

    def __init__(self, url: str) -> None:
        from sqlalchemy.engine import make_url

        from tests.deploy.conftest import free_port

        target = make_url(url)
        self.target = (target.host or "127.0.0.1", target.port or 5432)
        self.port = free_port()
        self.url = target.set(port=self.port).render_as_string(hide_password=False)
        self._sockets: list[socket.socket] = []
        self._listener: socket.socket | None = None

    def start(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # closed
                return
            server = socket.create_connection(self.target)
            self._sockets += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for end in (src, dst):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        for sock in [*self._sockets, *([self._listener] if self._listener else [])]:
            with contextlib.suppress(OSError):
                sock.close()


class SqliteOutage:
    """A SQLite URL whose path is a folder (the file cannot be opened) until ``start``
    puts a link to the real store there."""

    def __init__(self, url: str, where: Path) -> None:
        self.real = Path(url.removeprefix("sqlite:///"))
        self.path = where / "loopline.db"
        self.path.mkdir(parents=True)
        self.url = f"sqlite:///{self.path}"

    def start(self) -> None:
        self.path.rmdir()
        self.path.symlink_to(self.real)

    def close(self) -> None:
        pass


def outage_for(db_url: str, tmp_path: Path) -> Forward | SqliteOutage:
    if db_url.startswith("sqlite"):
        return SqliteOutage(db_url, tmp_path / "link")
    return Forward(db_url)


def test_a_store_down_at_start_is_opened_with_backoff(
    tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from loopline.drivers.metadata.database import safe_url
    from tests.deploy.models import wait_for

    monkeypatch.setenv("LOOPLINE_TEST_RELEASE_TOKEN", TOKEN)
    project = make_release_project(tmp_path / "project", env_yaml("prod"), metadata_url=db_url)
    store = project.store()
    good = project.versions["good"]
    release.promote(store, f"vehicles:{good}", to="prod")
    outage = outage_for(db_url, tmp_path)
    down = MetadataStore(outage.url, migrate=False)  # as open_environment opens it
    env = load_config(project.config).environment("prod")
    settings = ServeSettings(workers=1, token=TOKEN, flush_interval_s=0.2)
    app = create_env_app("prod", env, settings, down, project.artifacts_url(),
                         spill_dir=tmp_path)  # fmt: skip
    rec, state = app.state.reconciler, app.state.loopline
    state.accepting = True
    caplog.set_level(logging.INFO, logger="loopline.deploy")
    try:
        wait_for(lambda: rec.step() or rec.open_failures >= 3, 30, what="three failed opens")
        assert not state.ready and not rec.store_open
        reason = state.not_ready_reason()
        assert f"metadata store at {safe_url(outage.url)}" in reason and "\n" not in reason
        assert (
            reason.startswith("not ready: cannot reach the metadata store") and "retrying" in reason
        )
        with pytest.raises(NotReady, match="cannot reach the metadata store"):
            asyncio.run(rec.router.submit(images=[PNGS[0][1]]))
        said = [r for r in caplog.records if "metadata store" in r.getMessage()]
        assert len(said) == 1 and said[0].levelno == logging.WARNING  # once per outage

        outage.start()  # the store answers again
        wait_for(lambda: rec.step() or state.ready, 60, what="serving once the store answers")
        assert rec.store_open and rec.open_failures == 0
        assert "the metadata store is open (after" in caplog.text
        routed = asyncio.run(rec.router.submit(images=[PNGS[0][1]]))
        assert routed.served.version == good
        (row,) = store.deployments.replicas("prod")
        assert (row.replica_id, row.versions) == (rec.replica_id, [good])
    finally:
        rec.stop()
        down.close()
        store.close()
        outage.close()


def test_a_server_started_while_its_store_is_down_is_alive_then_serves(
    tmp_path: Path, pg_schema_url: str
) -> None:
    """A real server process (``--env``) started against a store that refuses connections:
    alive, not ready saying why, still running; serving once the store is back."""
    import httpx

    from loopline.drivers.metadata.database import safe_url
    from tests.deploy.models import env_server, ready, wait_for

    project = make_release_project(tmp_path / "p", env_yaml("live"), metadata_url=pg_schema_url)
    forward = Forward(pg_schema_url)
    store = project.store()
    try:
        with env_server(project, "live", "--metadata-url", forward.url) as server:
            r = httpx.get(server.url + "/v2/health/live")
            assert r.status_code == 200
            wait_for(lambda: "retrying with backoff" in server.output(), 30,
                     what="the store's failure logged", alive=server.proc)  # fmt: skip
            r = httpx.get(server.url + "/v2/health/ready")
            error = r.json()["error"]
            assert r.status_code == 503 and "\n" not in error
            assert f"cannot reach the metadata store at {safe_url(forward.url)}" in error
            time.sleep(1.0)  # a few more intervals, failing
            assert server.proc.poll() is None, server.output()
            assert server.output().count("retrying with backoff") == 1

            forward.start()
            good = project.versions["good"]
            release.promote(store, f"vehicles:{good}", to="live")
            wait_for(lambda: ready(server), 60, what="ready once the store is back",
                     alive=server.proc)  # fmt: skip
            r = httpx.post(server.url + "/v1/models/vehicles/predict", content=PNGS[2][1],
                           headers={"Content-Type": "image/png"})  # fmt: skip
            assert r.status_code == 200 and r.json()["model_version"] == good
    finally:
        store.close()
        forward.close()


def test_metrics_and_captures_are_labelled_by_the_model_served_not_the_one_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing is deployed when the server starts; once it serves vehicles, its request,
    log and capture metrics say so, and each capture row (with its prediction row) names
    the environment and the version that answered."""
    import httpx

    from tests.deploy.conftest import run_in_thread

    monkeypatch.setenv("LOOPLINE_TEST_RELEASE_TOKEN", TOKEN)
    project = make_release_project(tmp_path / "project", env_yaml("prod"))
    store = project.store()
    env = load_config(project.config).environment("prod")
    settings = ServeSettings(workers=1, token=TOKEN, flush_interval_s=0.2, capture=True,
                             artifacts_url=project.artifacts_url())  # fmt: skip
    app = create_env_app("prod", env, settings, store, project.artifacts_url(),
                         spill_dir=tmp_path)  # fmt: skip
    state = app.state.loopline
    good = project.versions["good"]
    try:
        release.promote(store, f"vehicles:{good}", to="prod")  # after the start
        with run_in_thread(app) as url:
            r = httpx.post(url + "/v1/models/vehicles/predict", content=PNGS[3][1],
                           params={"camera_id": "cam-7"},
                           headers={"Content-Type": "image/png"})  # fmt: skip
            assert r.status_code == 200, r.text
            pid = r.json()["predictions"][0]["prediction_id"]
            assert state.capture.flush(30) and state.predlog.flush(30)
            metrics = httpx.get(url + "/metrics").text
        served = 'model="vehicles",version=""'  # labels in the order Prometheus writes them
        predict = 'code="200",endpoint="/v1/models/{name}/predict",'
        assert f"loopline_requests_total{{{predict}{served}}} 1.0" in metrics
        assert f"loopline_capture_images_total{{{served}}} 1.0" in metrics
        assert f"loopline_prediction_log_written_rows_total{{{served}}} 1.0" in metrics
        assert f'loopline_batch_size_count{{model="vehicles",version="{good}"}} 1.0' in metrics
        capture = store.captures.get(pid)
        assert capture is not None and capture.environment == "prod"
        (row,) = [p for p in store.predictions.find("vehicles") if p.id == pid]
        assert (row.model_version, row.environment, row.variant, row.camera_id) == (
            good, "prod", "stable", "cam-7"
        )  # fmt: skip
    finally:
        store.close()

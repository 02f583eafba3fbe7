"""Production capture: a real server on loopback keeps request images content-addressed in the
artifact store, linked to their predictions, off the request path; reading one needs a token."""

from __future__ import annotations

import io
import shutil
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from sqlalchemy import create_engine

from loopline.config import load_config
from loopline.deploy.capture import NO_CAPTURE, CaptureWriter
from loopline.digest import sha256_bytes
from loopline.drivers.artifacts.store import ArtifactStore
from loopline.drivers.metadata.models import Capture
from loopline.drivers.metadata.store import MetadataStore
from tests.deploy.conftest import TOKEN, Project, image_bytes, server_process, serving

AUTH = {"Authorization": f"Bearer {TOKEN}"}
PREDICT = "/v1/models/vehicles/predict"


def predict(url: str, image: bytes, fmt: str = "png") -> str:
    r = httpx.post(url + PREDICT, content=image, headers={"Content-Type": f"image/{fmt}"})
    assert r.status_code == 200, r.text
    (one,) = r.json()["predictions"]
    return str(one["prediction_id"])


def artifacts(project: Project) -> ArtifactStore:
    return ArtifactStore(load_config(project.config).artifacts_url())


def blob_files(project: Project) -> set[str]:
    root = Path(load_config(project.config).artifacts_url()) / "sha256"
    return {p.name for p in root.rglob("*") if p.is_file()}


def noise_png(side: int) -> bytes:
    """A PNG that does not compress: about 3 * side**2 bytes."""
    from PIL import Image

    pixels = np.random.default_rng(side).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_each_image_is_stored_once_and_linked_to_its_prediction(fresh_project: Project) -> None:
    images = [image_bytes(1), image_bytes(2), image_bytes(3, "JPEG")]
    before = blob_files(fresh_project)
    with serving(fresh_project, capture=True) as running:
        ids = [predict(running.url, images[0]), predict(running.url, images[1])]
        ids.append(predict(running.url, images[2], "jpeg"))
        ids.append(predict(running.url, images[0]))  # the same bytes again
        files = {"a": ("a.png", images[1], "image/png"), "b": ("b.png", images[2], "image/png")}
        r = httpx.post(running.url + PREDICT, files=files)
        assert r.status_code == 200, r.text
        ids += [p["prediction_id"] for p in r.json()["predictions"]]
        writer = running.state.capture
        assert isinstance(writer, CaptureWriter) and writer.flush(30)
        metrics = httpx.get(running.url + "/metrics").text
    sent = [images[0], images[1], images[2], images[0], images[1], images[2]]
    store = fresh_project.store()
    try:
        for pid, data in zip(ids, sent, strict=True):
            got = store.captures.get(pid)
            assert got is not None, pid
            assert got.sha256 == sha256_bytes(data) and got.bytes == len(data)
            assert got.media_type == ("image/jpeg" if data is images[2] else "image/png")
            assert got.expires_at - got.at == timedelta(days=30)
            assert artifacts(fresh_project).get_bytes(got.sha256) == data
        assert store.captures.count() == 6
    finally:
        store.close()
    # Content-addressed: three distinct images, three new blobs.
    assert blob_files(fresh_project) - before == {sha256_bytes(b) for b in images}
    assert writer.captured == 6 and writer.captured_bytes == sum(len(b) for b in sent)
    assert 'loopline_capture_images_total{model="vehicles",version="1"} 6.0' in metrics


def test_reading_a_captured_image_needs_a_token(fresh_project: Project) -> None:
    image = image_bytes(11)
    with serving(fresh_project, capture=True) as running:
        pid = predict(running.url, image)
        assert running.state.capture.flush(30)
        path = f"{running.url}/v1/predictions/{pid}/image"
        r = httpx.get(path)
        assert r.status_code == 401 and "bearer token" in r.json()["error"]
        assert r.headers["www-authenticate"] == "Bearer"
        r = httpx.get(path, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        r = httpx.get(path, headers=AUTH)
        assert r.status_code == 200 and r.content == image
        assert r.headers["content-type"] == "image/png"
        assert r.headers["cache-control"] == "no-store"
        r = httpx.get(f"{running.url}/v1/predictions/{'0' * 32}/image", headers=AUTH)
        assert r.status_code == 404 and "no captured image" in r.json()["error"]
        # A blob changed on disk is refused, never served.
        blob = Path(artifacts(fresh_project).uri(sha256_bytes(image)))
        blob.write_bytes(image[:-1] + b"\0")
        r = httpx.get(path, headers=AUTH)
        assert r.status_code == 500 and "corrupt or tampered" in r.json()["error"]


def test_capture_is_off_by_default(server: Any) -> None:
    assert server.state.capture is NO_CAPTURE
    pid = predict(server.url, image_bytes(12))
    r = httpx.get(f"{server.url}/v1/predictions/{pid}/image", headers=AUTH)
    assert r.status_code == 404 and "capture is off" in r.json()["error"]


def test_sample_rate_zero_stores_nothing(fresh_project: Project) -> None:
    before = blob_files(fresh_project)
    with serving(fresh_project, capture=True, capture_sample_rate=0.0) as running:
        for seed in range(5):
            predict(running.url, image_bytes(20 + seed))
        assert running.state.capture.flush(30)
    store = fresh_project.store()
    try:
        assert store.captures.count() == 0
        assert store.predictions.count() == 5  # the predictions themselves are logged
    finally:
        store.close()
    assert blob_files(fresh_project) == before


def test_an_image_over_one_megabyte_is_not_captured(fresh_project: Project) -> None:
    big, small = noise_png(700), image_bytes(30)
    assert len(big) > 1 << 20 > len(small)
    with serving(fresh_project, capture=True, max_body_bytes=4 << 20) as running:
        big_id, small_id = predict(running.url, big), predict(running.url, small)
        writer = running.state.capture
        assert writer.flush(30)
        assert writer.skipped["too_large"] == 1
        metrics = httpx.get(running.url + "/metrics").text
    store = fresh_project.store()
    try:
        assert store.captures.get(big_id) is None
        assert store.captures.get(small_id) is not None
    finally:
        store.close()
    assert 'loopline_capture_skipped_images_total{model="vehicles",reason="too_large"' in metrics


def test_a_store_outage_fails_no_request(fresh_project: Project) -> None:
    root = Path(load_config(fresh_project.config).artifacts_url())
    with serving(fresh_project, capture=True) as running:
        writer = running.state.capture
        assert isinstance(writer, CaptureWriter)
        writer.retry_delay_s = 0.01
        # The artifact store fails every write: its temporary folder is now a file.
        shutil.rmtree(root / "tmp")
        (root / "tmp").write_bytes(b"")
        for seed in range(4):
            predict(running.url, image_bytes(40 + seed))
        assert writer.flush(60)
        assert writer.dropped["store_error"] == 4 and writer.captured == 0
        (root / "tmp").unlink()
        (root / "tmp").mkdir()
        # The metadata store fails: its captures table is gone.
        engine = create_engine(load_config(fresh_project.config).metadata_url())
        Capture.__table__.drop(engine)
        for seed in range(3):
            predict(running.url, image_bytes(50 + seed))
        assert writer.flush(60)
        assert writer.dropped["store_error"] == 7 and writer.captured == 0
        Capture.__table__.create(engine)
        engine.dispose()
        # Both back: capture resumes.
        pid = predict(running.url, image_bytes(60))
        assert writer.flush(60)
        assert writer.captured == 1
        metrics = httpx.get(running.url + "/metrics").text
    store = fresh_project.store()
    try:
        assert store.captures.get(pid) is not None and store.captures.count() == 1
        assert store.predictions.count() == 8  # every request was answered and logged
    finally:
        store.close()
    assert 'reason="store_error",version="1"} 7.0' in metrics


def test_the_writer_drains_on_stop(fresh_project: Project) -> None:
    with serving(fresh_project, capture=True) as running:
        ids = [predict(running.url, image_bytes(70 + seed)) for seed in range(6)]
    # No flush: stopping the server stored what was queued.
    store = fresh_project.store()
    try:
        assert all(store.captures.get(pid) is not None for pid in ids)
    finally:
        store.close()


def test_worker_processes_capture_with_the_flag(fresh_project: Project) -> None:
    """``--capture`` on the command line, two worker processes: the settings (the artifact
    store's URL among them) reach each worker, and SIGTERM stores what was queued."""
    images = [image_bytes(100 + seed) for seed in range(4)]
    with server_process(fresh_project, "--capture", "--workers", "2") as proc:
        ids = [predict(proc.url, data) for data in images]
        assert proc.stop() == 0
    store = fresh_project.store()
    try:
        for pid, data in zip(ids, images, strict=True):
            got = store.captures.get(pid)
            assert got is not None and got.sha256 == sha256_bytes(data)
            assert artifacts(fresh_project).get_bytes(got.sha256) == data
    finally:
        store.close()


def wait_for(condition: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.01)


def test_a_full_queue_drops_and_counts(tmp_path: Path) -> None:
    """The writer's thread is held up by a real lock on the SQLite store (another writer's
    open transaction): offers beyond the bound are dropped, counted, and never wait."""
    url = f"sqlite:///{tmp_path / 'loopline.db'}"
    store = MetadataStore(url)
    blobs = ArtifactStore(str(tmp_path / "artifacts"))
    writer = CaptureWriter(blobs, store.captures, max_queue=3, max_batch=1)
    writer.start()
    blocker = create_engine(url).raw_connection()
    try:
        blocker.execute("BEGIN IMMEDIATE")  # type: ignore[attr-defined]
        assert writer.offer(["p0"], [image_bytes(80)]) == 1
        # A batch of one: once the thread took it, it waits on the lock with it.
        wait_for(writer._queue.empty, "the writer took the first image")
        images = [image_bytes(81 + i) for i in range(5)]
        assert writer.offer([f"p{i + 1}" for i in range(5)], images) == 3
        assert writer.dropped["queue_full"] == 2
        blocker.rollback()
    finally:
        blocker.close()
    assert writer.flush(60)
    writer.stop()
    assert writer.captured == 4
    assert {r.prediction_id for r in store.captures.recent()} == {"p0", "p1", "p2", "p3"}
    assert writer.offer(["late"], [image_bytes(90)]) == 0  # stopped: nothing is taken
    store.close()


@pytest.mark.parametrize("rate", [1.0, 0.0])
def test_sampling_is_per_image(tmp_path: Path, rate: float) -> None:
    store = MetadataStore(f"sqlite:///{tmp_path / 'loopline.db'}")
    writer = CaptureWriter(ArtifactStore(str(tmp_path / "a")), store.captures, sample_rate=rate)
    writer.start()
    queued = writer.offer([f"p{i}" for i in range(20)], [image_bytes(i) for i in range(20)])
    assert writer.flush(30)
    writer.stop()
    assert queued == store.captures.count() == (20 if rate else 0)
    store.close()


def test_blobs_written_without_fsync_are_the_same_blobs_and_can_be_deleted(
    tmp_path: Path,
) -> None:
    blobs = ArtifactStore(str(tmp_path / "a"))
    data = image_bytes(91)
    fast = blobs.put_bytes(data, durable=False)
    assert fast == blobs.put_bytes(data)  # the same name, the same place
    assert fast.sha256 == sha256_bytes(data) and blobs.get_bytes(fast.sha256) == data
    assert not list((tmp_path / "a" / "tmp").iterdir())  # no temporary file left behind
    assert blobs.delete(fast.sha256) is True and not blobs.exists(fast.sha256)
    assert blobs.delete(fast.sha256) is False


# -- the capture read scope ----------------------------------------------------------------------
READER = "capture-reader-secret"


def test_a_capture_read_token_is_the_only_one_that_reads_images(fresh_project: Project) -> None:
    image = image_bytes(120)
    with serving(fresh_project, capture=True, capture_read_token=READER) as running:
        pid = predict(running.url, image)
        assert running.state.capture.flush(30)
        path = f"{running.url}/v1/predictions/{pid}/image"
        r = httpx.get(path)
        assert r.status_code == 401 and "bearer token" in r.json()["error"]
        r = httpx.get(path, headers=AUTH)  # the client token: good for feedback, not this
        assert r.status_code == 403
        assert "needs the capture read token" in r.json()["error"]
        r = httpx.get(path, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"] == "invalid bearer token"
        r = httpx.get(path, headers={"Authorization": f"Bearer {READER}"})
        assert r.status_code == 200 and r.content == image
        # The client token still does what it is for.
        feedback = httpx.post(f"{running.url}/v1/feedback", headers=AUTH,
                              json={"prediction_id": pid, "label": "car"})  # fmt: skip
        assert feedback.status_code == 200, feedback.text


def test_the_read_token_comes_from_its_variable_and_never_from_a_flag_or_the_file(
    fresh_project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    from loopline.deploy.environment_app import environment_settings
    from loopline.deploy.settings import load_settings, serve_flags
    from loopline.errors import ConfigError

    settings = load_settings(env={"LOOPLINE_SERVE_CAPTURE_READ_TOKEN": "a, b"})
    assert settings.capture_read_tokens() == ["a", "b"]
    assert "capture_read_token" not in {f.dest for f in serve_flags()}
    assert settings.to_env()["LOOPLINE_SERVE_CAPTURE_READ_TOKEN"] == "a, b"  # to the workers
    config = fresh_project.config
    base = config.read_text()
    config.write_text(base + "environments:\n  production:\n    capture: "
                      "{read_token: '${LOOPLINE_TEST_READER}', purge_interval_s: 60, "
                      "max_total_bytes: 5000}\n")  # fmt: skip
    monkeypatch.delenv("LOOPLINE_TEST_READER", raising=False)
    with pytest.raises(ConfigError, match=r"\$\{LOOPLINE_TEST_READER\}, which is not set"):
        environment_settings(config, "production")
    monkeypatch.setenv("LOOPLINE_TEST_READER", READER)
    built = load_settings(base=environment_settings(config, "production"), env={})
    assert built.capture_read_tokens() == [READER]
    assert built.capture_purge_interval_s == 60 and built.capture_max_total_bytes == 5000
    assert READER not in repr(built)
    config.write_text(base + "environments:\n  production:\n    capture: {read_token: plain}\n")
    with pytest.raises(ConfigError, match="read token as an environment reference"):
        load_config(config)
    config.write_text(base + "environments:\n  production:\n    serve: "
                      "{capture_read_token: plain}\n")  # fmt: skip
    with pytest.raises(ConfigError, match=r"capture\.read_token: \$\{ENV\}"):
        load_config(config)


# -- retention, applied by the server ------------------------------------------------------------
def _seed_expired(store: MetadataStore, blobs: ArtifactStore, n: int, tag: str) -> list[str]:
    """``n`` captures of 40 days ago (their retention is 30), each with a blob of its own."""
    from datetime import UTC, datetime

    at = datetime.now(UTC) - timedelta(days=40)
    rows = []
    for i in range(n):
        data = image_bytes(500 + i) + tag.encode()
        blobs.put_bytes(data)
        rows.append({"prediction_id": f"{tag}-{i}", "sha256": sha256_bytes(data),
                     "bytes": len(data), "media_type": "image/png", "environment": "production",
                     "at": at, "expires_at": at + timedelta(days=30)})  # fmt: skip
    store.captures.record(rows)
    return [r["sha256"] for r in rows]


def test_replicas_purge_by_themselves_and_each_capture_goes_once(
    db_url: str, tmp_path: Path
) -> None:
    """Three writers (as three replicas) purge the same store every 50 ms: the expired
    captures and their blobs go, exactly once in all; recent ones stay."""
    store = MetadataStore(db_url)
    blobs = ArtifactStore(str(tmp_path / "a"))
    old = _seed_expired(store, blobs, 12, "old")
    stores = [MetadataStore(db_url) for _ in range(3)]
    writers = [CaptureWriter(blobs, s.captures, purge_interval_s=0.05) for s in stores]
    try:
        for w in writers:
            w.start()
        fresh = [f"new-{i}" for i in range(3)]
        assert writers[0].offer(fresh, [image_bytes(600 + i) for i in range(3)]) == 3
        assert writers[0].flush(30)
        wait_for(lambda: all(w.purges >= 2 for w in writers), "two purges by each writer", 60)
    finally:
        for w in writers:
            w.stop()
        for s in stores:
            s.close()
    assert sum(w.purged for w in writers) == 12
    assert {r.prediction_id for r in store.captures.recent()} == set(fresh)
    assert not any(blobs.exists(d) for d in old)
    assert all(blobs.exists(r.sha256) for r in store.captures.recent())
    store.close()


def test_no_purge_thread_without_an_interval(tmp_path: Path) -> None:
    store = MetadataStore(f"sqlite:///{tmp_path / 'loopline.db'}")
    blobs = ArtifactStore(str(tmp_path / "a"))
    _seed_expired(store, blobs, 2, "kept")
    writer = CaptureWriter(blobs, store.captures, purge_interval_s=0.0)
    writer.start()
    writer.stop()
    assert writer.purges == 0 and store.captures.count() == 2
    store.close()


def test_the_environment_server_purges_and_serves_images_to_the_read_scope_only(
    fresh_project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real ``--env`` server, two workers, from ``loopline.yaml``: ``capture:
    {read_token: ${...}, purge_interval_s: ...}`` reaches both; expired captures go by
    themselves; a new one is read with the read token and refused to the client token."""
    import os
    import subprocess
    import sys

    from tests.deploy.conftest import free_port, wait_ready

    port = free_port()
    config = fresh_project.config
    config.write_text(
        config.read_text() + "environments:\n  production:\n"
        f"    port: {port}\n    token: '${{LOOPLINE_TEST_CLIENT}}'\n"
        "    serve: {workers: 2, flush_interval_s: 0.2}\n"
        "    capture: {read_token: '${LOOPLINE_TEST_READER}', purge_interval_s: 0.5}\n"
    )
    url = f"http://127.0.0.1:{port}"
    store = fresh_project.store()
    old = _seed_expired(store, artifacts(fresh_project), 3, "old")
    store.deployments.change("production", expected_generation=0, action="deploy", actor="t",
                             model_name="vehicles", stable_version=1)  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPLINE_SERVE_")}
    env.update(LOOPLINE_TEST_CLIENT=TOKEN, LOOPLINE_TEST_READER=READER)
    log = fresh_project.root / "env-server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "loopline.deploy.server", "--env", "production",
             "--config", str(config), "--log-level", "warning"],
            stdout=out, stderr=subprocess.STDOUT, cwd=fresh_project.root, env=env,
        )  # fmt: skip
    try:
        wait_ready(url, timeout=120, alive=lambda: proc.poll() is None)
        wait_for(lambda: store.captures.count() == 0, "the server's purge", 60)
        assert not any(artifacts(fresh_project).exists(d) for d in old)
        image = image_bytes(130)
        pid = predict(url, image)
        path = f"{url}/v1/predictions/{pid}/image"
        reader = {"Authorization": f"Bearer {READER}"}
        wait_for(lambda: httpx.get(path, headers=reader).status_code == 200, "the capture")
        assert httpx.get(path, headers=reader).content == image
        for _ in range(6):  # whichever worker answers, the client token may not read it
            r = httpx.get(path, headers=AUTH)
            assert r.status_code == 403 and "capture read token" in r.json()["error"]
    finally:
        proc.terminate()
        proc.wait(60)
        store.close()
    assert proc.returncode == 0, log.read_text()
    assert READER not in log.read_text()

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

"""POST /v1/models/{name}/predict: raw and multipart bodies, one image or many, metadata."""

from __future__ import annotations

import httpx
import pytest

from tests.deploy.conftest import LABELS, Running, image_bytes, reference_labels


def test_raw_png_and_jpeg(server: Running, model_bytes: bytes) -> None:
    png, jpeg = image_bytes(1), image_bytes(2, "JPEG")
    want = reference_labels(model_bytes, [png, jpeg])
    for body, ctype, label in ((png, "image/png", want[0]), (jpeg, "image/jpeg", want[1])):
        r = httpx.post(
            f"{server.url}/v1/models/vehicles/predict",
            content=body,
            headers={"Content-Type": ctype},
        )
        assert r.status_code == 200, r.text
        data = r.json()
        assert data["model"] == "vehicles" and data["model_version"] == 1
        (p,) = data["predictions"]
        assert p["label"] == label
        assert p["model_version"] == 1
        assert len(p["prediction_id"]) == 32
        assert set(p["probabilities"]) == set(LABELS)
        assert p["confidence"] == pytest.approx(max(p["probabilities"].values()))
        assert sum(p["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)


def test_multipart_many_with_metadata_is_logged(server: Running, model_bytes: bytes) -> None:
    images = [image_bytes(i) for i in range(10, 15)]
    files = [("files", (f"{i}.png", b, "image/png")) for i, b in enumerate(images)]
    r = httpx.post(
        f"{server.url}/v1/models/vehicles/versions/1/predict?camera_id=cam-7",
        files=files,
        data={"captured_at": "2026-11-27T08:15:00Z", "metadata": '{"lane": 2}'},
    )
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert [p["label"] for p in preds] == reference_labels(model_bytes, images)
    assert len({p["prediction_id"] for p in preds}) == 5

    assert server.state.predlog.flush(10)
    store = server.project.store()
    rows = {row.id: row for row in store.predictions.find("vehicles", 1)}
    for p in preds:
        row = rows[p["prediction_id"]]
        assert row.label == p["label"]
        assert row.confidence == pytest.approx(p["confidence"], abs=1e-6)
        assert row.source == "v1"
        assert row.request_metadata == {
            "camera_id": "cam-7",
            "captured_at": "2026-11-27T08:15:00Z",
            "lane": 2,
        }
        assert set(row.input_stats) >= {"brightness", "contrast", "mean_rgb", "bytes"}
        assert 0 <= row.input_stats["brightness"] <= 255
        assert row.probabilities is not None and len(row.probabilities) == len(LABELS)
    store.close()


def test_octet_stream_and_model_info(server: Running) -> None:
    r = httpx.post(
        f"{server.url}/v1/models/vehicles/predict",
        content=image_bytes(3),
        headers={"Content-Type": "application/octet-stream"},
    )
    assert r.status_code == 200
    info = httpx.get(f"{server.url}/v1/models/vehicles").json()
    assert info["labels"] == LABELS and info["version"] == 1
    assert info["bundle_sha256"] == server.project.bundle_sha256


def test_openapi_lists_the_hot_endpoints(server: Running) -> None:
    paths = httpx.get(f"{server.url}/openapi.json").json()["paths"]
    assert "image/png" in paths["/v1/models/{name}/predict"]["post"]["requestBody"]["content"]
    assert "post" in paths["/v2/models/{name}/infer"]
    assert "get" in paths["/v2/models/{name}/ready"]

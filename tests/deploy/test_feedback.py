"""POST /v1/feedback: tokens, idempotency, per-item validation; admin flush; metrics."""

from __future__ import annotations

import httpx

from tests.deploy.conftest import TOKEN, Project, Running, image_bytes, serving

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def predict_ids(server: Running, n: int) -> list[str]:
    files = [("f", (f"{i}.png", image_bytes(100 + i), "image/png")) for i in range(n)]
    r = httpx.post(f"{server.url}/v1/models/vehicles/predict", files=files)
    assert r.status_code == 200, r.text
    return [p["prediction_id"] for p in r.json()["predictions"]]


def test_feedback_needs_a_valid_token(server: Running) -> None:
    body = {"prediction_id": "x", "label": "car"}
    url = f"{server.url}/v1/feedback"
    r = httpx.post(url, json=body)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert "bearer token" in r.json()["error"]
    assert httpx.post(url, json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.post(url, json=body, headers={"Authorization": TOKEN}).status_code == 401
    assert httpx.post(f"{server.url}/v1/admin/flush").status_code == 401


def test_feedback_is_idempotent_and_reported_per_item(server: Running) -> None:
    a, b = predict_ids(server, 2)
    url = f"{server.url}/v1/feedback"
    # Sent right after predicting: the server flushes its log before looking ids up.
    r = httpx.post(url, json={"prediction_id": a, "label": "car"}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["results"] == [{"prediction_id": a, "label": "car", "status": "recorded"}]
    items = [
        {"prediction_id": a, "label": "car"},  # same again
        {"prediction_id": b, "label": "bus"},  # new
        {"prediction_id": "f" * 32, "label": "car"},  # unknown id
        {"prediction_id": b, "label": "tractor"},  # unknown label
        {"prediction_id": 5, "label": "car"},  # malformed
    ]
    r = httpx.post(url, json=items, headers=AUTH)
    assert r.status_code == 200, r.text
    data = r.json()
    assert [x["status"] for x in data["results"]] == [
        "unchanged", "recorded", "error", "error", "error",
    ]  # fmt: skip
    assert "unknown prediction_id" in data["results"][2]["error"]
    assert "unknown label 'tractor'" in data["results"][3]["error"]
    assert (data["recorded"], data["unchanged"], data["errors"]) == (1, 1, 3)
    r = httpx.post(url, json={"items": [{"prediction_id": b, "label": "van"}]}, headers=AUTH)
    assert r.json()["results"][0]["status"] == "updated"
    store = server.project.store()
    assert store.predictions.feedback([a, b]) == {a: "car", b: "van"}
    store.close()


def test_malformed_feedback_requests(server: Running) -> None:
    url = f"{server.url}/v1/feedback"
    for content, ctype, status in (
        (b"", "application/json", 400),
        (b"{oops", "application/json", 400),
        (b"[]", "application/json", 400),
        (b'"text"', "application/json", 400),
        (b'{"prediction_id": "a", "label": "car"}', "text/plain", 415),
    ):
        r = httpx.post(url, content=content, headers={**AUTH, "Content-Type": ctype})
        assert r.status_code == status, (content, r.text)
        assert r.json()["error"]


def test_admin_flush_and_metrics(server: Running) -> None:
    predict_ids(server, 3)
    r = httpx.post(f"{server.url}/v1/admin/flush", headers=AUTH)
    assert r.status_code == 200 and r.json() == {"flushed": True, "pending": 0}
    text = httpx.get(f"{server.url}/metrics").text
    for needle in (
        'loopline_requests_total{code="200",endpoint="/v1/models/{name}/predict",model="vehicles"',
        "loopline_request_duration_seconds_bucket{",
        "loopline_request_errors_total{",
        'loopline_batch_size_bucket{le="1.0",model="vehicles",version="1"}',
        'loopline_predictions_total{label="car",model="vehicles",version="1"}',
        "loopline_prediction_confidence_bucket{",
        "loopline_prediction_log_written_rows_total{",
    ):
        assert needle in text, needle


def test_writes_are_closed_without_a_configured_token(fresh_project: Project) -> None:
    with serving(fresh_project, token=None) as running:
        r = httpx.post(f"{running.url}/v1/feedback", json={"prediction_id": "a", "label": "car"})
        assert r.status_code == 403 and "LOOPLINE_SERVE_TOKEN" in r.json()["error"]


def test_token_on_predict_when_asked(fresh_project: Project) -> None:
    with serving(fresh_project, require_token_for_predict=True) as running:
        url = f"{running.url}/v1/models/vehicles/predict"
        png = {"content": image_bytes(1), "headers": {"Content-Type": "image/png"}}
        assert httpx.post(url, **png).status_code == 401
        png["headers"].update(AUTH)
        assert httpx.post(url, **png).status_code == 200
        assert httpx.post(f"{running.url}/v2/models/vehicles/infer", json={}).status_code == 401
        assert httpx.get(f"{running.url}/v2/health/ready").status_code == 200

"""The server as a process: SIGTERM loses no prediction, --workers shares the port."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.deploy.conftest import TOKEN, Project, image_bytes, server_process


def predict(url: str, i: int) -> list[str]:
    if i % 3 == 0:
        files = [("f", (f"{k}.png", image_bytes(i * 10 + k), "image/png")) for k in range(3)]
        r = httpx.post(f"{url}/v1/models/vehicles/predict?camera_id=c{i}", files=files)
    else:
        r = httpx.post(f"{url}/v1/models/vehicles/predict?camera_id=c{i}",
                       content=image_bytes(i), headers={"Content-Type": "image/png"})  # fmt: skip
    assert r.status_code == 200, r.text
    return [p["prediction_id"] for p in r.json()["predictions"]]


def logged_ids(project: Project) -> set[str]:
    store = project.store()
    try:
        return {p.id for p in store.predictions.find("vehicles", 1)}
    finally:
        store.close()


def test_sigterm_flushes_every_prediction(fresh_project: Project) -> None:
    # A long flush interval: whatever is logged got there through the graceful stop.
    with server_process(fresh_project, "--flush-interval-s", "600") as server:
        with ThreadPoolExecutor(8) as pool:
            ids = [pid for batch in pool.map(lambda i: predict(server.url, i), range(60))
                   for pid in batch]  # fmt: skip
        assert len(ids) == len(set(ids)) == 100
        assert logged_ids(fresh_project) == set()
        assert server.stop() in (0, -15)  # uvicorn re-raises SIGTERM after a clean stop
    assert logged_ids(fresh_project) == set(ids)


def test_two_workers_share_the_port_and_the_log(fresh_project: Project) -> None:
    with server_process(fresh_project, "--workers", "2", "--flush-interval-s", "0.2") as server:
        with ThreadPoolExecutor(4) as pool:
            ids = [pid for batch in pool.map(lambda i: predict(server.url, i), range(1, 21))
                   for pid in batch]  # fmt: skip
        metrics = httpx.get(f"{server.url}/metrics").text
        assert "loopline_requests_total" in metrics
        # Right after predicting: some ids still wait in the other worker's buffer.
        feedback = [{"prediction_id": pid, "label": "car"} for pid in ids]
        r = httpx.post(f"{server.url}/v1/feedback", json=feedback,
                       headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)  # fmt: skip
        assert r.status_code == 200 and r.json()["recorded"] == len(ids), r.text
        assert server.stop() in (0, -15)  # uvicorn re-raises SIGTERM after a clean stop
    assert logged_ids(fresh_project) == set(ids)

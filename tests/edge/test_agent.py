"""The edge agent end to end: a real hub on loopback, a real agent subprocess, real bundles.

Each test starts the agent against a hub that follows the metadata store, then changes the
deployment with the library API (``release.promote``), as ``loopline promote`` does.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from loopline.digest import sha256_file
from tests.edge.conftest import AgentFactory, EdgeProject, HubServer, wait_for
from tests.edge.models import png

pytestmark = pytest.mark.timeout(300)


def predict(agent_url: str, seed: int = 0, camera: str | None = None) -> dict[str, Any]:
    params = {"camera_id": camera} if camera else None
    r = httpx.post(agent_url + "/predict", content=png(seed), params=params,
                   headers={"Content-Type": "image/png"}, timeout=10)  # fmt: skip
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_agent_follows_a_promotion_and_answers_throughout_the_swap(
    edge_project: EdgeProject, hub_server: HubServer, agents: AgentFactory, broker: str
) -> None:
    v1, v2 = edge_project.register("car"), edge_project.register("van")
    edge_project.promote(v1)
    agent = agents.start(hub_server.url, "--mqtt-url", broker)
    health = agent.wait_version(v1)
    assert health["model"] == f"m:{v1}" and health["status"] == "ok"

    answers: list[tuple[str, str]] = []
    failures: list[str] = []
    stop = threading.Event()

    def hammer(seed: int) -> None:
        with httpx.Client(timeout=10) as client:
            while not stop.is_set():
                try:
                    r = client.post(agent.url + "/predict", content=png(seed),
                                    headers={"Content-Type": "image/png"})  # fmt: skip
                except httpx.HTTPError as err:
                    failures.append(repr(err))
                    continue
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.text}")
                    continue
                body = r.json()
                answers.append((body["model"], body["label"]))

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(answers) >= 20, 30, "answers from version 1")
        state = edge_project.promote(v2)
        health = agent.wait_version(v2)
        seen = len(answers)
        wait_for(lambda: len(answers) >= seen + 20, 30, "answers after the swap")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert failures == []
    assert health["generation"] == state.generation and health["status"] == "ok"
    # Each answer comes whole from one version: v1 answers car, v2 van, nothing else.
    assert set(answers) == {(f"m:{v1}", "car"), (f"m:{v2}", "van")}
    assert answers[-1] == (f"m:{v2}", "van")
    first_v2 = answers.index((f"m:{v2}", "van"))
    assert (f"m:{v1}", "car") not in answers[first_v2 + 2 :]  # in flight at the swap, at most


def test_a_tampered_bundle_is_refused_and_the_old_version_keeps_serving(
    edge_project: EdgeProject, hub_server: HubServer, agents: AgentFactory
) -> None:
    v1 = edge_project.register("car")
    edge_project.promote(v1)
    agent = agents.start(hub_server.url, "--mqtt-url", "none")
    agent.wait_version(v1)
    store = edge_project.store()
    try:
        # A bundle whose model no longer matches its manifest: refused after the download.
        bad = edge_project.register_tampered()
        edge_project.promote(bad)
        health = wait_for(lambda: _error_health(agent), 30, "the agent reporting an error")
        assert health["version"] == v1 and f"refused m:{bad}" in health["error"]
        assert "does not match its sha256 in the manifest" in health["error"]
        assert predict(agent.url)["model"] == f"m:{v1}"
        device = wait_for(lambda: _device_error(store, edge_project.env, f"refused m:{bad}"),
                          30, "the refusal reaching the store")  # fmt: skip
        assert device["status"] == "error" and device["version"] == v1
        bad_sha = store.models.get("m", bad).bundle_sha256
        assert not [p for p in (agent.work_dir / "bundles").iterdir() if bad_sha in p.name]

        # A corrupt copy in the hub's cache is noticed by the hub, which fetches the bundle
        # again from the artifact store; the refused version's error is gone once a good
        # version runs.
        v3 = edge_project.register("truck")
        sha3 = store.models.get("m", v3).bundle_sha256
        cache = edge_project.root / "hub-cache"
        cache.mkdir(exist_ok=True)
        (cache / f"{sha3}.tar").write_bytes(b"not the bundle")
        edge_project.promote(v3)
        health = agent.wait_version(v3)
        assert health["status"] == "ok" and health["error"] is None
        assert predict(agent.url)["label"] == "truck"
        assert sha256_file(cache / f"{sha3}.tar") == sha3
    finally:
        store.close()


def _error_health(agent: Any, contains: str = "") -> dict[str, Any] | None:
    h = agent.health()
    if h and h.get("status") == "error" and contains in (h.get("error") or ""):
        return h
    return None


def _device_error(store: Any, env: str, contains: str) -> dict[str, Any] | None:
    row = store.devices.get(env, "dev-1")
    if row and contains in (row["info"].get("error") or ""):
        return dict(row)
    return None


@pytest.mark.slow  # two agent starts and two hub starts: ~20 s on a busy machine
def test_predictions_wait_while_the_hub_is_away_and_arrive_once(
    edge_project: EdgeProject, hub_server: HubServer, agents: AgentFactory
) -> None:
    v1 = edge_project.register("car")
    edge_project.promote(v1)
    agent = agents.start(hub_server.url, "--mqtt-url", "none")
    agent.wait_version(v1)
    store = edge_project.store()
    try:
        online = [predict(agent.url, i)["id"] for i in range(3)]
        wait_for(lambda: _stored(store, online) == set(online), 30, "online predictions stored")

        hub_server.stop()
        offline = [predict(agent.url, i, camera="cam-7")["id"] for i in range(20)]
        wait_for(lambda: agent.health()["pending_predictions"] == 20, 30, "20 rows spooled")
        assert _stored(store, offline) == set()
        # The device restarts while the hub is still away: it serves the model it had,
        # verified again from its disk, and its spool survives.
        assert agent.stop() == 0
        agent = agents.start(f"http://127.0.0.1:{edge_project.hub_port}", "--mqtt-url", "none")
        health = agent.wait_version(v1)
        assert health["hub_reachable"] is False and health["pending_predictions"] == 20
        offline += [predict(agent.url, 100 + i, camera="cam-7")["id"] for i in range(5)]

        hub_server.start()
        wait_for(lambda: _stored(store, offline) == set(offline), 30, "the spool uploaded")
        wait_for(lambda: agent.health()["pending_predictions"] == 0, 30, "an empty spool")
        rows = [p for p in store.predictions.find(model_name="m") if p.environment]
        ids = [p.id for p in rows]
        assert sorted(ids) == sorted(online + offline)  # every one, and each once
        by_id = {p.id: p for p in rows}
        for pid in offline:
            p = by_id[pid]
            assert p.environment == edge_project.env and p.camera_id == "cam-7"
            assert p.request_metadata["device_id"] == "dev-1"
            assert (p.model_version, p.label, p.source) == (v1, "car", "edge-http")
    finally:
        store.close()


def _stored(store: Any, ids: list[str]) -> set[str]:
    return {p.id for p in store.predictions.find(model_name="m")} & set(ids)


def test_frames_in_a_folder_are_inferred_once_and_logged(
    edge_project: EdgeProject, hub_server: HubServer, agents: AgentFactory, tmp_path: Path
) -> None:
    v1 = edge_project.register("car")
    edge_project.promote(v1)
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(3):
        (frames / f"f{i}.png").write_bytes(png(i))
    (frames / "bad.png").write_bytes(b"not an image")
    (frames / "notes.txt").write_text("ignored")
    (frames / ".partial.png").write_bytes(png(9))  # still being written by the camera
    agent = agents.start(hub_server.url, "--mqtt-url", "none", "--frames", str(frames))
    agent.wait_version(v1)
    results = agent.work_dir / "frames.jsonl"

    def lines() -> list[dict[str, Any]]:
        if not results.exists():
            return []
        return [json.loads(line) for line in results.read_text().splitlines()]

    wait_for(lambda: len(lines()) >= 4, 30, "four frames processed")
    (frames / "f3.png").write_bytes(png(3))
    wait_for(lambda: len(lines()) >= 5, 30, "the new frame processed")
    got = {line["file"]: line for line in lines()}
    assert sorted(got) == ["bad.png", "f0.png", "f1.png", "f2.png", "f3.png"]
    assert len(lines()) == 5  # each once
    assert "error" in got["bad.png"] and "cannot decode" in got["bad.png"]["error"]
    assert all(got[f"f{i}.png"]["label"] == "car" for i in range(4))
    store = edge_project.store()
    try:
        ids = {got[f"f{i}.png"]["id"] for i in range(4)}
        wait_for(lambda: _stored(store, list(ids)) == ids, 30, "frame predictions stored")
        rows = [p for p in store.predictions.find(model_name="m") if p.id in ids]
        assert {p.source for p in rows} == {"edge-frames"}
        assert {p.request_metadata["frame"] for p in rows} == {f"f{i}.png" for i in range(4)}
    finally:
        store.close()

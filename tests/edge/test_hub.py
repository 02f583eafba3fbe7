"""The hub's HTTP API on every metadata backend (SQLite, PostgreSQL), and its MQTT subscriber
against the real broker: tokens, 4xx JSON errors, deployments, bundles, reports, uploads."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from loopline.digest import sha256_bytes
from tests.edge.conftest import (
    TOKEN,
    TOKEN_VAR,
    EdgeProject,
    HubServer,
    make_edge_project,
    wait_for,
)

AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def project(tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch) -> EdgeProject:
    monkeypatch.setenv(TOKEN_VAR, TOKEN)
    return make_edge_project(tmp_path / "project", db_url=db_url)


@pytest.fixture
def hub(project: EdgeProject) -> Iterator[HubServer]:
    server = HubServer(project).start()
    yield server
    server.stop()


def report(device: str = "cam-1", **over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "device_id": device, "status": "ok", "model_name": "m", "version": 1, "generation": 1,
        "host": "pi", "error": None, "info": {"endpoint": "http://10.0.0.7:8095"},
        "telemetry": {"cpu_percent": 12.5},
        "samples": [{"at": datetime.now(UTC).isoformat(), "version": 1,
                     "metrics": {"cpu_percent": 12.5, "sensors": {"t_c": 40.0}}}],
    }  # fmt: skip
    body.update(over)
    return body


def row(pid: str | None = None, **over: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": pid or uuid.uuid4().hex, "at": datetime.now(UTC).isoformat(), "model_name": "m",
        "model_version": 1, "source": "edge-http", "label": "car", "confidence": 0.9,
        "probabilities": [0.9, 0.05, 0.05], "request_metadata": {"camera_id": "cam-9"},
        "input_stats": {"brightness": 10.0}, "generation": 1,
    }  # fmt: skip
    out.update(over)
    return out


def test_every_endpoint_needs_the_token_and_errors_are_json(
    project: EdgeProject, hub: HubServer
) -> None:
    env = project.env
    calls = [
        ("GET", f"/v1/edge/{env}/deployment", None),
        ("GET", f"/v1/edge/bundles/{'a' * 64}", None),
        ("POST", f"/v1/edge/{env}/telemetry", report()),
        ("POST", f"/v1/edge/{env}/predictions", {"device_id": "cam-1", "rows": [row()]}),
    ]
    for method, path, body in calls:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic x"}):
            r = httpx.request(method, hub.url + path, json=body, headers=headers)
            assert r.status_code == 401, (method, path, headers, r.text)
            assert r.headers["content-type"] == "application/json"
            assert isinstance(r.json()["error"], str) and TOKEN not in r.text
            assert r.headers["www-authenticate"] == "Bearer"
    r = httpx.get(hub.url + "/v1/edge/elsewhere/deployment", headers=AUTH)
    assert r.status_code == 404 and env in r.json()["error"]
    r = httpx.get(hub.url + "/v1/edge/nothing-here", headers=AUTH)
    assert r.status_code == 404 and "no such endpoint" in r.json()["error"]
    store = project.store()
    try:
        assert store.devices.list() == [] and store.predictions.count() == 0
    finally:
        store.close()


def test_deployment_and_bundles_follow_the_store(project: EdgeProject, hub: HubServer) -> None:
    env = project.env
    r = httpx.get(f"{hub.url}/v1/edge/{env}/deployment", headers=AUTH)
    assert r.status_code == 200
    assert r.json()["version"] is None and r.json()["bundle_sha256"] is None
    v1, v2 = project.register("car"), project.register("van")
    state = project.promote(v1)
    store = project.store()
    try:
        sha1 = store.models.get("m", v1).bundle_sha256
        sha2 = store.models.get("m", v2).bundle_sha256
    finally:
        store.close()
    body = httpx.get(f"{hub.url}/v1/edge/{env}/deployment", headers=AUTH).json()
    assert (body["model_name"], body["version"], body["bundle_sha256"]) == ("m", v1, sha1)
    assert body["generation"] == state.generation and body["poll_s"] == 0.3
    r = httpx.get(f"{hub.url}/v1/edge/bundles/{sha1}", headers=AUTH)
    assert r.status_code == 200 and sha256_bytes(r.content) == sha1
    # A registered version that no environment deploys is not handed out; nor is junk.
    r = httpx.get(f"{hub.url}/v1/edge/bundles/{sha2}", headers=AUTH)
    assert r.status_code == 404 and "not deployed" in r.json()["error"]
    r = httpx.get(f"{hub.url}/v1/edge/bundles/NOT-A-DIGEST", headers=AUTH)
    assert r.status_code == 400 and "64 lowercase hex" in r.json()["error"]
    project.promote(v2)
    body = httpx.get(f"{hub.url}/v1/edge/{env}/deployment", headers=AUTH).json()
    assert body["version"] == v2 and body["bundle_sha256"] == sha2
    r = httpx.get(f"{hub.url}/v1/edge/bundles/{sha2}", headers=AUTH)
    assert r.status_code == 200 and sha256_bytes(r.content) == sha2


def test_reports_become_device_rows_telemetry_and_replicas(
    project: EdgeProject, hub: HubServer
) -> None:
    env = project.env
    url = f"{hub.url}/v1/edge/{env}/telemetry"
    r = httpx.post(url, json=report(), headers=AUTH)
    assert r.status_code == 200 and r.json()["samples"] == 1
    r = httpx.post(url, json=report(status="updating", samples=[]), headers=AUTH)
    assert r.status_code == 200
    for bad, what in (
        (report(device_id="has space"), "device_id"),
        (report(status=""), "status"),
        (report(extra=1), "extra"),
        ({**report(), "samples": [{"metrics": {}, "at": "yesterday"}]}, "samples.0.at"),
    ):
        r = httpx.post(url, json=bad, headers=AUTH)
        assert r.status_code == 400 and what in r.json()["error"], r.text
    r = httpx.post(url, content=b"{not json", headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    store = project.store()
    try:
        [device] = store.devices.list(env)
        assert (device["device_id"], device["status"], device["version"], device["via"]) == (
            "cam-1", "updating", 1, "http",
        )  # fmt: skip
        [sample] = store.devices.telemetry(env, "cam-1")
        assert sample["metrics"]["sensors"] == {"t_c": 40.0} and sample["via"] == "http"
        [replica] = store.deployments.replicas(env)
        assert replica.replica_id == "edge:cam-1" and replica.versions == [1]
        assert replica.endpoint == "http://10.0.0.7:8095"
    finally:
        store.close()


def test_prediction_uploads_are_idempotent(project: EdgeProject, hub: HubServer) -> None:
    env = project.env
    url = f"{hub.url}/v1/edge/{env}/predictions"
    rows = [row() for _ in range(5)]
    body = {"device_id": "cam-1", "rows": rows}
    for _ in range(2):  # the second time: an upload whose answer was lost, sent again
        r = httpx.post(url, json=body, headers=AUTH)
        assert r.status_code == 200 and r.json()["accepted"] == 5
    r = httpx.post(url, json={"device_id": "cam-1", "rows": [row(confidence=2.0)]}, headers=AUTH)
    assert r.status_code == 400 and "confidence" in r.json()["error"]
    r = httpx.post(url, json={"device_id": "cam-1", "rows": [row()] * 1001}, headers=AUTH)
    assert r.status_code == 400 and "rows" in r.json()["error"]
    store = project.store()
    try:
        stored = store.predictions.find(model_name="m")
        assert sorted(p.id for p in stored) == sorted(r["id"] for r in rows)
        for p in stored:
            assert p.environment == env and p.camera_id == "cam-9" and p.variant == "stable"
            assert p.request_metadata == {"camera_id": "cam-9", "device_id": "cam-1"}
            assert p.deployment_generation == 1 and p.source == "edge-http"
    finally:
        store.close()


def test_mqtt_reports_are_recorded_like_http_ones(
    project: EdgeProject, hub: HubServer, broker: str
) -> None:
    import paho.mqtt.client as mqtt

    wait_for(lambda: hub.hub.mqtt_state() == "connected", 30, "the hub's MQTT subscription")
    env, prefix = project.env, project.prefix
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.connect("127.0.0.1", 1883)
    client.loop_start()
    try:
        topic = f"{prefix}/{env}/cam-2/telemetry"
        client.publish(f"{prefix}/{env}/cam-3/telemetry", json.dumps(report("cam-2")), qos=1)
        client.publish(topic, b"{broken", qos=1)
        client.publish(topic, json.dumps(report("cam-2")), qos=1).wait_for_publish(5)
        store = project.store()
        try:
            wait_for(lambda: store.devices.get(env, "cam-2"), 30, "the MQTT report recorded")
            client.publish(f"{prefix}/{env}/cam-2/status", b"offline", qos=1).wait_for_publish(5)
            wait_for(lambda: store.devices.get(env, "cam-2")["status"] == "offline", 30,
                     "the device marked offline")  # fmt: skip
            devices = store.devices.list(env)
            # The report under another device's topic was dropped, and so was the junk.
            assert [d["device_id"] for d in devices] == ["cam-2"]
            assert devices[0]["via"] == "mqtt"
            [sample] = store.devices.telemetry(env, "cam-2")
            assert sample["via"] == "mqtt" and sample["metrics"]["cpu_percent"] == 12.5
        finally:
            store.close()
    finally:
        client.disconnect()
        client.loop_stop()
    assert hub.hub.subscriber.dropped == 2


def test_a_hub_without_a_token_does_not_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from loopline.config import load_config
    from loopline.drivers.metadata.store import MetadataStore
    from loopline.edge.hub import Hub
    from loopline.errors import ConfigError

    project = make_edge_project(tmp_path / "p", mqtt=False)
    monkeypatch.delenv(TOKEN_VAR, raising=False)
    cfg = load_config(project.config_path)
    store = MetadataStore(cfg.metadata_url())
    try:
        with pytest.raises(ConfigError, match=TOKEN_VAR):
            Hub(cfg, [project.env], store)
        monkeypatch.setenv(TOKEN_VAR, "")
        with pytest.raises(ConfigError, match="no device token"):
            Hub(cfg, [project.env], store)
    finally:
        store.close()

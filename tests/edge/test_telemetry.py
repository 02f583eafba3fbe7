"""Heartbeat and telemetry from a real agent reach the metadata store over HTTP and over MQTT
(the real Mosquitto broker), and the device's MQTT status is retained: online, then offline."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.edge.conftest import AgentFactory, EdgeProject, HubServer, wait_for
from tests.edge.test_agent import predict

pytestmark = pytest.mark.timeout(300)


def retained_status(broker: str, topic: str) -> str | None:
    """The retained message on ``topic`` (None when there is none), read by a fresh client."""
    import paho.mqtt.client as mqtt

    got: dict[str, str] = {}
    done = threading.Event()

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        if msg.retain:
            got["payload"] = msg.payload.decode()
        done.set()

    def on_connect(client: Any, *_: Any) -> None:
        client.subscribe(topic, qos=1)

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.on_message = on_message
    client.on_connect = on_connect
    client.connect("127.0.0.1", 1883)
    client.loop_start()
    try:
        done.wait(2.0)  # a retained message comes at once after subscribing; none: timeout
    finally:
        client.disconnect()
        client.loop_stop()
    return got.get("payload")


def test_telemetry_reaches_the_store_over_http_and_mqtt(
    edge_project: EdgeProject,
    hub_server: HubServer,
    agents: AgentFactory,
    broker: str,
    tmp_path: Path,
) -> None:
    v1 = edge_project.register("car")
    edge_project.promote(v1)
    sensors = tmp_path / "sensors.json"
    sensors.write_text(json.dumps({"board_temp_c": 41.5, "lux": 120, "ignored": [1]}))
    agent = agents.start(hub_server.url, "--mqtt-url", broker, "--sensors-file", str(sensors))
    agent.wait_version(v1)
    for i in range(5):
        predict(agent.url, i)
    store = edge_project.store()
    env = edge_project.env
    try:

        def both() -> dict[str, dict[str, Any]] | None:
            by_via: dict[str, dict[str, Any]] = {}
            for s in store.devices.telemetry(env, "dev-1"):
                if s["metrics"].get("inferences_total", 0) >= 5:
                    by_via[s["via"]] = s
            return by_via if set(by_via) == {"http", "mqtt"} else None

        latest = wait_for(both, 30, "telemetry over HTTP and over MQTT")
        for via in ("http", "mqtt"):
            sample = latest[via]
            m = sample["metrics"]
            assert sample["version"] == v1 and m["running"] == f"m:{v1}"
            assert m["latency_ms_p50"] > 0 and m["latency_ms_p95"] >= m["latency_ms_p50"]
            assert m["cpu_percent"] >= 0 and m["rss_mb"] > 10
            assert m["sensors"]["board_temp_c"] == 41.5 and m["sensors"]["lux"] == 120
            assert "ignored" not in m["sensors"]
        device = store.devices.get(env, "dev-1")
        assert device is not None
        assert (device["version"], device["model_name"], device["status"]) == (v1, "m", "ok")
        assert device["info"]["endpoint"] == agent.url
        listed = store.devices.list(env)
        assert [d["device_id"] for d in listed] == ["dev-1"]
        replicas = {r.replica_id: r for r in store.deployments.replicas(env)}
        assert replicas["edge:dev-1"].versions == [v1] and replicas["edge:dev-1"].status == "ok"

        topic = f"{edge_project.prefix}/{env}/dev-1/status"
        assert retained_status(broker, topic) == "online"
        assert agent.stop() == 0
        assert retained_status(broker, topic) == "offline"
        wait_for(lambda: store.devices.get(env, "dev-1")["status"] == "offline", 30,
                 "the device marked offline")  # fmt: skip
    finally:
        store.close()

"""store.devices on every backend: heartbeats upsert, telemetry appends, listings read back."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from loopline.drivers.metadata.store import MetadataStore


@pytest.fixture
def store(db_url: str):
    s = MetadataStore(db_url)
    yield s
    s.close()


def test_heartbeat_inserts_then_updates_keeping_first_seen(store: MetadataStore) -> None:
    store.devices.heartbeat("edge-a", "cam-1", model_name="m", version=1, status="ok",
                            host="pi-1", info={"agent": "0.1"}, telemetry={"cpu_percent": 3.5},
                            via="http")  # fmt: skip
    first = store.devices.get("edge-a", "cam-1")
    assert first is not None
    store.devices.heartbeat("edge-a", "cam-1", model_name="m", version=2, status="updating",
                            telemetry={"cpu_percent": 9.0}, via="mqtt")  # fmt: skip
    rows = store.devices.list("edge-a")
    assert len(rows) == 1
    row = rows[0]
    assert (row["env"], row["device_id"], row["version"], row["status"], row["via"]) == (
        "edge-a", "cam-1", 2, "updating", "mqtt",
    )  # fmt: skip
    assert row["model_version"] == 2 and row["model_name"] == "m"
    assert row["telemetry"] == {"cpu_percent": 9.0}
    assert row["first_seen"] == first["first_seen"]
    assert row["last_seen"] >= first["last_seen"]
    assert datetime.fromisoformat(row["last_seen"]).tzinfo is not None


def test_list_filters_by_environment_and_orders_by_device(store: MetadataStore) -> None:
    for env, dev in (("b", "z"), ("a", "y"), ("b", "x")):
        store.devices.heartbeat(env, dev, model_name=None, version=None, status="no-model")
    assert [(d["env"], d["device_id"]) for d in store.devices.list()] == [
        ("a", "y"), ("b", "x"), ("b", "z"),
    ]  # fmt: skip
    assert [d["device_id"] for d in store.devices.list("b")] == ["x", "z"]
    assert store.devices.list("nowhere") == []


def test_record_telemetry_many_samples_and_read_back(store: MetadataStore) -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    samples = [
        {"environment": "e", "device_id": "d1", "via": "http", "at": t0 + timedelta(seconds=i),
         "model_version": 1, "metrics": {"i": i}}
        for i in range(5)
    ]  # fmt: skip
    samples.append({"environment": "e", "device_id": "d2", "via": "mqtt", "metrics": {"i": 99}})
    assert store.devices.record_telemetry(samples) == 6
    d1 = store.devices.telemetry("e", "d1")
    assert [s["metrics"]["i"] for s in d1] == [0, 1, 2, 3, 4]
    assert d1[0]["version"] == 1 and d1[0]["via"] == "http"
    assert datetime.fromisoformat(d1[0]["at"]) == t0
    # The latest two, still oldest first; and since a time.
    assert [s["metrics"]["i"] for s in store.devices.telemetry("e", "d1", limit=2)] == [3, 4]
    since = store.devices.telemetry("e", "d1", since=t0 + timedelta(seconds=3))
    assert [s["metrics"]["i"] for s in since] == [3, 4]
    everything = store.devices.telemetry("e")
    assert {s["device_id"] for s in everything} == {"d1", "d2"}
    assert store.devices.record_telemetry([]) == 0


def test_set_status_only_for_known_devices(store: MetadataStore) -> None:
    assert store.devices.set_status("e", "ghost", "offline", via="mqtt") is False
    assert store.devices.list() == []
    store.devices.heartbeat("e", "d", model_name="m", version=3, status="ok")
    assert store.devices.set_status("e", "d", "offline", via="mqtt") is True
    row = store.devices.get("e", "d")
    assert row is not None and row["status"] == "offline" and row["version"] == 3


def test_invalid_values_are_refused(store: MetadataStore) -> None:
    with pytest.raises(ValueError, match="via"):
        store.devices.heartbeat("e", "d", model_name=None, version=None, status="ok", via="smtp")
    with pytest.raises(ValueError, match="status"):
        store.devices.heartbeat("e", "d", model_name=None, version=None, status="x" * 17)
    with pytest.raises(ValueError, match="via"):
        store.devices.record_telemetry([{"environment": "e", "device_id": "d", "via": "x"}])
    assert store.devices.list() == []

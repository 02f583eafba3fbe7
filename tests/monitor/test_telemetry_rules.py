"""Health rules on device telemetry and serving counters, read from a real store, and the
lifecycle they drive. The view is a stand-in with only what ``telemetry.measure`` reads."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from loopline.drivers.metadata.store import MetadataStore
from loopline.monitor import telemetry
from loopline.monitor.config import AlertRule, MonitorConfig
from loopline.monitor.lifecycle import evaluate
from loopline.monitor.types import GLOBAL, Logged, Outcome

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
CONFIG = MonitorConfig()


@dataclass
class View:
    store: MetadataStore
    environment: str = "production"
    model_name: str = "vehicles"
    model_version: int = 1
    now: datetime = NOW
    reference: Any = None

    def scopes(self, segment_by: list[str]) -> list[str]:
        return []

    def new_outcomes(self, scope: str) -> list[Outcome]:
        return []

    def labelled(
        self, scope: str, count: int | None = None, seconds: float | None = None
    ) -> list[Outcome]:
        return []

    def logged(
        self, scope: str, count: int | None = None, seconds: float | None = None
    ) -> list[Logged]:
        return []

    def new_logged(self, scope: str) -> list[Logged]:
        return []


def rule(metric: str, op: str = ">", threshold: float = 80.0, **kw: Any) -> AlertRule:
    return AlertRule(name=f"{metric}-rule", metric=metric, op=op, threshold=threshold,  # type: ignore[arg-type]
                     min_samples=kw.pop("min_samples", 2), **kw)  # fmt: skip


@pytest.fixture
def store(tmp_path: Path) -> Iterator[MetadataStore]:
    s = MetadataStore(f"sqlite:///{tmp_path / 'loopline.db'}")
    yield s
    s.close()


def report(store: MetadataStore, device: str, values: list[float], *, key: str = "temperature_c",
           start: float = -50.0, version: int | None = 1, model: str = "vehicles",
           env: str = "production") -> None:  # fmt: skip
    """Device heartbeat plus one sample every 10 s from ``start`` seconds before NOW."""
    store.devices.heartbeat(env, device, model_name=model, version=version, status="ok")
    store.devices.record_telemetry([
        {"environment": env, "device_id": device, "via": "http", "model_version": version,
         "at": NOW + timedelta(seconds=start + 10 * i), "metrics": {key: v, "note": "x"}}
        for i, v in enumerate(values)
    ])  # fmt: skip


def test_global_rule_takes_the_worst_device_over_the_time_window(store: MetadataStore) -> None:
    report(store, "edge-1", [70, 71, 72, 73, 74, 75])  # at -50 .. 0 s
    report(store, "edge-2", [99, 99, 85, 86, 87, 88])
    report(store, "edge-3", [90, 90, 90], model="other")  # another model: not ours
    report(store, "edge-4", [95, 95, 95], version=2)  # another version (a canary)
    (m,) = telemetry.measure(rule("telemetry.temperature_c", window_s=35), View(store), {}, CONFIG)
    assert m.scope == GLOBAL and m.evidence["device"] == "edge-2"
    assert m.value == pytest.approx((85 + 86 + 87 + 88) / 4) and m.samples == 4  # last 35 s
    assert set(m.evidence["per_device"]) == {"edge-1", "edge-2"}
    low = rule("telemetry.temperature_c", op="<", threshold=10.0, window=2)
    (m,) = telemetry.measure(low, View(store), {}, CONFIG)
    assert m.evidence["device"] == "edge-1" and m.value == pytest.approx(74.5)  # min, last 2


def test_per_device_scopes_and_no_data(store: MetadataStore) -> None:
    report(store, "edge-1", [50, 60])
    report(store, "edge-2", [90])  # one sample: under min_samples
    seg = rule("telemetry.temperature_c", window=5, scope="segment")
    got = {m.scope: m for m in telemetry.measure(seg, View(store), {}, CONFIG)}
    assert set(got) == {"device=edge-1", "device=edge-2"}
    assert got["device=edge-1"].value == 55.0
    assert got["device=edge-2"].value is None and got["device=edge-2"].samples == 1
    # No sample of the key at all; and a window that holds none: no-data.
    (m,) = telemetry.measure(rule("telemetry.cpu_percent", window=5), View(store), {}, CONFIG)
    assert m.value is None and m.samples == 0
    later = View(store, now=NOW + timedelta(hours=1))
    (m,) = telemetry.measure(rule("telemetry.temperature_c", window_s=60), later, {}, CONFIG)
    assert m.value is None
    # With neither window nor window_s: the latest sample of each device.
    (m,) = telemetry.measure(rule("telemetry.temperature_c", min_samples=1), View(store), {},
                             CONFIG)  # fmt: skip
    assert m.value == 90.0 and m.samples == 1


def _selects_on_telemetry(store: MetadataStore) -> list[str]:
    """The SELECTs on the telemetry table the store runs from now on."""
    from sqlalchemy import event

    seen: list[str] = []

    def before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "FROM TELEMETRY" in (
            statement.upper()
        ):
            seen.append(statement)

    event.listen(store.engine, "before_cursor_execute", before)
    return seen


def test_one_read_of_the_samples_per_rule_for_all_devices(store: MetadataStore) -> None:
    for i in range(5):
        report(store, f"edge-{i}", [70.0 + i, 71.0 + i, 72.0 + i])
    reads = _selects_on_telemetry(store)
    for r in (rule("telemetry.temperature_c", window_s=35, scope="segment"),
              rule("telemetry.temperature_c", window=2)):  # fmt: skip
        telemetry.measure(r, View(store), {}, CONFIG)
    assert len(reads) == 2  # one per rule, not one per device


def test_a_chatty_device_does_not_crowd_out_a_quiet_one(store: MetadataStore) -> None:
    report(store, "edge-1", [60.0] * 20, start=-190)  # every 10 s up to NOW
    report(store, "edge-2", [95.0, 96.0, 97.0], start=-500)  # long ago, but its last three
    seg = rule("telemetry.temperature_c", window=3, scope="segment")
    got = {m.scope: (m.value, m.samples) for m in telemetry.measure(seg, View(store), {}, CONFIG)}
    assert got == {"device=edge-1": (60.0, 3), "device=edge-2": (96.0, 3)}


def serving_stats(requests: int, errors: int, p95: float | None, version: int = 1) -> dict:
    return {"versions": {str(version): {"requests": requests, "errors": errors, "p95_ms": p95}}}


def deploy(store: MetadataStore, generations: int = 1) -> int:
    """A deployment of vehicles:1 in production, changed ``generations`` times: its generation."""
    for v in (1, 2):
        store.models.register("vehicles", bundle_uri=f"/b{v}", bundle_sha256=f"{v}" * 64,
                              aliases=())  # fmt: skip
    for g in range(generations):
        store.deployments.change("production", expected_generation=g, action="promote",
                                 actor="test", model_name="vehicles", stable_version=1)  # fmt: skip
    dep = store.deployments.get("production")
    assert dep is not None
    return dep.generation


def test_serving_error_rate_and_p95_over_replicas(store: MetadataStore) -> None:
    deploy(store)
    deps = store.deployments
    deps.report_replica("production", "r1", generation=1, versions=[1], status="ok",
                        stats=serving_stats(100, 2, 40.0))  # fmt: skip
    deps.report_replica("production", "r2", generation=1, versions=[1], status="ok",
                        stats=serving_stats(300, 18, 95.5))  # fmt: skip
    deps.report_replica("production", "r3", generation=1, versions=[2], status="ok",
                        stats=serving_stats(1000, 900, 999.0, version=2))  # fmt: skip
    deps.report_replica("production", "r0", generation=0, versions=[1], status="ok",
                        stats=serving_stats(5000, 5000, 1.0))  # fmt: skip  # a stale generation
    view = View(store)
    (m,) = telemetry.measure(rule("serving.error_rate", threshold=0.05), view, {}, CONFIG)
    assert m.value == pytest.approx(20 / 400) and m.samples == 400
    assert set(m.evidence["replicas"]) == {"r1", "r2"}
    (m,) = telemetry.measure(rule("serving.p95_ms", threshold=50.0), view, {}, CONFIG)
    assert m.value == 95.5
    (m,) = telemetry.measure(rule("serving.requests", threshold=1.0), view, {}, CONFIG)
    assert m.value == 400
    seg = rule("serving.error_rate", threshold=0.05, scope="segment")
    got = {m.scope: m.value for m in telemetry.measure(seg, view, {}, CONFIG)}
    assert got == {"replica=r1": 0.02, "replica=r2": 0.06}
    few = rule("serving.error_rate", threshold=0.05, min_samples=1000)
    assert telemetry.measure(few, view, {}, CONFIG)[0].value is None
    assert telemetry.measure(few, View(store, environment="staging"), {}, CONFIG)[0].value is None


def test_serving_measures_what_the_replicas_counted_since_the_last_pass(
    store: MetadataStore,
) -> None:
    """The replicas' counters are lifetime (since the generation): the rule measures the
    delta, so a bad minute after a good hour is seen, and a restart is not a negative."""
    generation = deploy(store, generations=2)
    deps = store.deployments

    def beat(rid: str, requests: int, errors: int, pid: int = 1, gen: int = generation) -> None:
        deps.report_replica("production", rid, generation=gen, versions=[1], status="ok",
                            pid=pid, stats=serving_stats(requests, errors, 12.0))  # fmt: skip

    errors = rule("serving.error_rate", threshold=0.05, min_samples=50)
    state: dict[str, Any] = {}

    def measured() -> tuple[float | None, int]:
        nonlocal state
        state = json.loads(json.dumps(state))  # the service persists it as JSON
        (m,) = telemetry.measure(errors, View(store), state, CONFIG)
        return m.value, m.samples

    beat("r1", 10_000, 10)
    beat("r2", 10_000, 10)
    assert measured() == (pytest.approx(20 / 20_000), 20_000)  # first pass: all they counted
    beat("r1", 10_050, 40)  # a bad spell: 30 errors in 50 requests
    beat("r2", 10_050, 40)
    assert measured() == (pytest.approx(60 / 100), 100)  # not 80 / 20,100
    beat("r1", 10_060, 40)  # ten more requests: under min_samples, no-data ...
    assert measured() == (None, 10)
    beat("r1", 10_100, 40)
    assert measured() == (pytest.approx(0.0), 50)  # ... they add up until there are enough
    beat("r1", 30, 3)  # r1 restarted: its counters went down, all it has is new
    beat("r2", 10_070, 40)
    assert measured() == (pytest.approx(3 / 50), 50)
    beat("r1", 90, 3, pid=2)  # restarted again, already past its old count: another pid
    beat("r2", 10_070, 40)
    assert measured() == (pytest.approx(3 / 90), 90)  # r1's 90 since its restart, r2 none
    # A replica still on the previous generation is left out.
    beat("r3", 99_999, 99_999, gen=generation - 1)
    beat("r1", 190, 13, pid=2)
    assert measured() == (pytest.approx(10 / 100), 100)
    assert set(state["replicas"]) == {"r1", "r2"}


def test_a_hot_device_fires_and_resolves(store: MetadataStore) -> None:
    hot = rule("telemetry.temperature_c", window=3, threshold=80.0, resolve_threshold=70.0,
               cooldown_s=0)  # fmt: skip
    report(store, "edge-1", [85, 86, 87])
    (m,) = telemetry.measure(hot, View(store), {}, CONFIG)
    changes = evaluate(store, hot, m, NOW)
    assert [c.kind for c in changes] == ["firing"]
    assert changes[0].alert.details["evidence"]["device"] == "edge-1"
    report(store, "edge-1", [75, 75, 75], start=10)  # cooler, not yet 70: keeps firing
    later = View(store, now=NOW + timedelta(seconds=40))
    (m,) = telemetry.measure(hot, later, {}, CONFIG)
    assert m.value == 75.0 and evaluate(store, hot, m, later.now) == []
    report(store, "edge-1", [60, 60, 60], start=50)
    later = View(store, now=NOW + timedelta(seconds=80))
    (m,) = telemetry.measure(hot, later, {}, CONFIG)
    assert [c.kind for c in evaluate(store, hot, m, later.now)] == ["resolved"]

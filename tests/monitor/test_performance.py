"""Labelled metrics against hand-computed values, over windows and straight from the store."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest

from loopline.drivers.metadata.store import MetadataStore
from loopline.errors import ConfigError
from loopline.monitor import performance
from loopline.monitor.config import AlertRule, MonitorConfig
from loopline.monitor.stream import NewRows
from loopline.monitor.types import GLOBAL, Outcome
from loopline.monitor.windows import Windows

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
# Ten labelled predictions (actual, predicted), oldest first. By hand:
#   accuracy 7/10; precision car 3/4, bus 2/4, van 2/2; recall car 3/4, bus 2/3, van 2/3;
#   F1 car 0.75, bus 4/7, van 0.8.
PAIRS = [("car", "car"), ("car", "car"), ("car", "car"), ("car", "bus"), ("bus", "bus"),
         ("bus", "bus"), ("bus", "car"), ("van", "van"), ("van", "bus"),
         ("van", "van")]  # fmt: skip
MACRO_P = (0.75 + 0.5 + 1.0) / 3
MACRO_R = (0.75 + 2 / 3 + 2 / 3) / 3
MACRO_F1 = (0.75 + 4 / 7 + 0.8) / 3


def outcomes(pairs: list[tuple[str, str]] = PAIRS) -> list[Outcome]:
    return [
        Outcome(
            f"p{i}",
            T0 + timedelta(seconds=i),
            T0 + timedelta(seconds=60 + i),
            1,
            None,
            pred,
            actual,
            0.9,
            {"camera_id": "c1" if i < 5 else "c2"},
        )  # fmt: skip
        for i, (actual, pred) in enumerate(pairs)
    ]


def view(now_s: float = 120, labels: list[str] | None = None) -> Any:
    w = Windows(500, 7 * 86400)
    w.add(NewRows(outcomes(), [], {}))
    ref = SimpleNamespace(labels=labels) if labels else None
    return w.view("production", "m", 1, T0 + timedelta(seconds=now_s), None, ref)  # type: ignore[arg-type]


def rule(metric: str = "accuracy", **kw: Any) -> AlertRule:
    kw.setdefault("window", 10)
    kw.setdefault("min_samples", 5)
    return AlertRule(name="r", metric=metric, threshold=0.4, **kw)


@pytest.mark.parametrize(
    ("metric", "expected"),
    [
        ("accuracy", 0.7),
        ("macro_precision", MACRO_P),
        ("macro_recall", MACRO_R),
        ("macro_f1", MACRO_F1),
    ],  # fmt: skip
)
def test_metrics_over_the_window(metric: str, expected: float) -> None:
    [m] = performance.measure(rule(metric), view(), {}, MonitorConfig())
    assert (m.metric, m.scope, m.samples, m.model_version) == (metric, GLOBAL, 10, 1)
    assert m.value == pytest.approx(expected)
    assert m.evidence["n"] == 10 and m.evidence["correct"] == 7
    assert m.evidence["accuracy"] == pytest.approx(0.7)
    assert m.window == "last 10 labelled"


def test_evidence_no_data_resolve_window_and_reference_labels() -> None:
    [m] = performance.measure(rule(), view(), {}, MonitorConfig())
    assert m.evidence["top_confusions"] == [
        {"actual": "bus", "predicted": "car", "count": 1},
        {"actual": "car", "predicted": "bus", "count": 1},
        {"actual": "van", "predicted": "bus", "count": 1},
    ]
    assert m.evidence["first_at"] == T0.isoformat() and m.evidence["stale"] is False
    assert "resolve_value" not in m.evidence  # resolve_window defaults to window

    [none] = performance.measure(rule(min_samples=11), view(), {}, MonitorConfig())
    assert none.value is None and none.samples == 10 and none.evidence["n"] == 10

    # The newest 4 (p6..p9): 2 right; resolve over all 10: 7 right.
    [m4] = performance.measure(rule(window=4, min_samples=4, resolve_window=20), view(), {},
                               MonitorConfig())  # fmt: skip
    assert m4.value == pytest.approx(0.5) and m4.samples == 4
    assert m4.evidence["resolve_value"] == pytest.approx(0.7)
    assert m4.evidence["resolve_samples"] == 10

    # A reference class that never occurs changes no macro average (no support).
    labels = ["bus", "car", "truck", "van"]
    [mp] = performance.measure(rule("macro_recall"), view(labels=labels), {}, MonitorConfig())
    assert mp.value == pytest.approx(MACRO_R)


def test_stale_labels_are_no_data() -> None:
    cfg = MonitorConfig(stale_labels_s=600)
    [m] = performance.measure(rule(), view(now_s=60 + 9 + 601), {}, cfg)
    assert m.value is None and m.evidence["stale"] is True
    assert m.evidence["stale_value"] == pytest.approx(0.7)
    [fresh] = performance.measure(rule(), view(now_s=60 + 9 + 599), {}, cfg)
    assert fresh.value == pytest.approx(0.7)


def test_segment_rules_measure_each_camera() -> None:
    seg = rule(scope="segment", min_samples=3)
    got = {m.scope: m for m in performance.measure(seg, view(), {}, MonitorConfig())}
    # One per camera value and not GLOBAL: a global rule covers the whole stream.
    assert list(got) == ["camera_id=c1", "camera_id=c2"]
    assert got["camera_id=c1"].value == pytest.approx(4 / 5)  # p0..p4: p3 wrong
    assert got["camera_id=c2"].value == pytest.approx(3 / 5)  # p5..p9: p6, p8 wrong
    assert performance.measure(seg, view(), {}, MonitorConfig(segments=["site"])) == []


def test_a_rule_of_another_kind_is_refused() -> None:
    with pytest.raises(ConfigError, match="not a labelled metric"):
        performance.measure(AlertRule(name="c", metric="cusum", threshold=9), view(), {},
                            MonitorConfig())  # fmt: skip


def test_current_metrics_from_the_store(db_url: str) -> None:
    store = MetadataStore(db_url)

    def row(pid: str, i: int, version: int, label: str, variant: str = "stable") -> dict[str, Any]:
        return {"id": pid, "at": T0 + timedelta(seconds=i), "model_name": "m",
                "model_version": version, "source": "v1", "label": label, "confidence": 0.9,
                "environment": "production", "variant": variant,
                "camera_id": "c1" if i % 10 < 5 else "c2",
                "request_metadata": {"site": "n" if i < 10 else "s"}}  # fmt: skip

    rows, truth = [], []
    for i, (actual, pred) in enumerate(PAIRS * 2):  # 20 answers of version 1
        rows.append(row(f"a{i:031d}", i, 1, pred))
        truth.append((f"a{i:031d}", actual))
    for i in range(4):  # version 2: always right; a shadow answer, always wrong
        actual = PAIRS[i][0]
        rows += [row(f"b{i:031d}", i, 2, actual), row(f"s{i:031d}", i, 2, "truck", "shadow")]
        truth += [(f"b{i:031d}", actual), (f"s{i:031d}", actual)]
    store.predictions.log(rows)
    store.predictions.record_feedback(truth)

    got = performance.current_metrics(store, "m", window=10, by="camera_id")
    by = {(r["version"], r["scope"]): r for r in got["rows"]}
    assert list(by) == [(1, GLOBAL), (1, "camera_id=c1"), (1, "camera_id=c2"), (2, GLOBAL),
                        (2, "camera_id=c1")]  # fmt: skip
    v1 = by[(1, GLOBAL)]  # the newest 10: the second copy of PAIRS
    assert (v1["n"], v1["correct"]) == (10, 7)
    assert v1["accuracy"] == pytest.approx(0.7) and v1["macro_f1"] == pytest.approx(MACRO_F1)
    assert v1["first_at"] == (T0 + timedelta(seconds=10)).isoformat()
    # Per camera: its own newest 10 (c1 has 10: i % 10 < 5), p3-type miss twice.
    assert (by[(1, "camera_id=c1")]["n"], by[(1, "camera_id=c1")]["correct"]) == (10, 8)
    assert (by[(2, GLOBAL)]["n"], by[(2, GLOBAL)]["accuracy"]) == (4, 1.0)  # no shadow rows

    sites = performance.current_metrics(store, "m", window=5, by="site", version=1)
    assert [(r["scope"], r["n"]) for r in sites["rows"]] == [(GLOBAL, 5), ("site=n", 5),
                                                             ("site=s", 5)]  # fmt: skip
    assert performance.current_metrics(store, "m", environment="staging")["rows"] == []
    with pytest.raises(ConfigError, match="window 0"):
        performance.current_metrics(store, "m", window=0)
    store.close()

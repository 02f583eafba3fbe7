"""The Prometheus export: rules equivalent to monitor.rules, on metrics that exist (the
monitor's gauges and the prediction server's own), validated by parsing and, where promtool
is on PATH, by promtool (check and unit tests of the rules' behaviour)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from loopline.config import Config, parse_config
from loopline.errors import ConfigError
from loopline.monitor import exposition, prometheus
from loopline.monitor.config import default_rules
from loopline.monitor.exposition import MonitorMetrics
from loopline.monitor.prometheus import check_expr, check_rules, export_rules, validate_rules
from loopline.monitor.types import GLOBAL, Measurement

SERVING_RULES = [
    {
        "name": "errors-high",
        "metric": "serving.error_rate",
        "op": ">",
        "threshold": 0.02,
        "window_s": 120,
        "min_samples": 20,
        "severity": "critical",
    },
    {"name": "slow", "metric": "serving.p95_ms", "op": ">", "threshold": 500, "min_samples": 20},
    {
        "name": "hot",
        "metric": "telemetry.temperature_c",
        "op": ">",
        "threshold": 80,
        "min_samples": 1,
        "for_s": 90,
        "resolve_threshold": 70,
    },
]


def _config(tmp_path: Path, rules: list[dict[str, Any]] | None = None) -> Config:
    monitor = {} if rules is None else {"rules": rules}
    return parse_config({"project": "demo", "monitor": monitor}, tmp_path)


def _rules(text: str) -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(text)["groups"] for r in g["rules"]]


def _by_alert(text: str) -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for r in _rules(text)}


# -- export -----------------------------------------------------------------------------------
def test_the_default_export_validates_and_has_one_alert_per_rule() -> None:
    text = export_rules(Config())
    assert check_rules(text) == []
    validate_rules(text)
    groups = yaml.safe_load(text)["groups"]
    rules = groups[0]["rules"]
    assert [r["labels"]["rule"] for r in rules] == [r.name for r in default_rules()]
    low = _by_alert(text)["LooplineAccuracyLow"]
    assert low["labels"] == {"severity": "critical", "rule": "accuracy-low", "action": "retrain"}
    # accuracy < 0.40 over 50, and hysteresis: firing until >= 0.50 over 100
    assert low["expr"].startswith('(loopline_monitor_metric{rule="accuracy-low"} < 0.4) or ')
    assert 'loopline_monitor_resolve_metric{rule="accuracy-low"} < 0.5' in low["expr"]
    assert 'ALERTS{alertname="LooplineAccuracyLow", alertstate="firing"}' in low["expr"]
    assert "for" not in low  # for_s 0: fires at once, as the monitor does
    assert "last 50 labelled predictions" in low["annotations"]["description"]
    drift = _by_alert(text)["LooplinePredictionDrift"]
    assert drift["expr"] == 'loopline_monitor_metric{rule="prediction-drift"} > 0.0'
    assert groups[1]["rules"][0]["alert"] == "LooplineMonitorStalled"


def test_for_s_is_a_prometheus_duration(tmp_path: Path) -> None:
    text = export_rules(_config(tmp_path, SERVING_RULES))
    validate_rules(text)
    hot = _by_alert(text)["LooplineHot"]
    assert hot["for"] == "1m30s"
    assert hot["expr"].startswith('(loopline_monitor_metric{rule="hot"} > 80.0) or ')
    assert 'loopline_monitor_metric{rule="hot"} > 70.0 and on(' in hot["expr"]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (90, "1m30s"), (3600, "1h"), (0.25, "250ms"), (86_401, "1d1s"), (300, "5m")],
)
def test_duration(seconds: float, text: str) -> None:
    assert prometheus.duration(seconds) == text


def test_serving_rules_read_the_servers_metrics(tmp_path: Path) -> None:
    rules = _by_alert(export_rules(_config(tmp_path, SERVING_RULES)))
    errors, slow = rules["LooplineErrorsHigh"]["expr"], rules["LooplineSlow"]["expr"]
    assert 'rate(loopline_request_errors_total{code=~"5..", endpoint=~' in errors
    assert "[2m]" in errors and errors.endswith(">= 20")
    assert (
        "histogram_quantile(0.95, " in slow and "loopline_request_duration_seconds_bucket" in slow
    )
    assert "[5m]" in slow and "* 1000 > 500.0" in slow
    assert "keep_firing_for" not in rules["LooplineErrorsHigh"]


def test_unknown_metrics_are_rejected_when_the_config_loads(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown metric 'latency'"):
        _config(tmp_path, [{"name": "x", "metric": "latency", "threshold": 1}])


def test_every_metric_an_expression_names_exists(tmp_path: Path) -> None:
    """The names in the exported expressions against what the server and the monitor
    really expose (deploy/metrics.py, monitor/exposition.py)."""
    from loopline.deploy.metrics import ServerMetrics

    server = ServerMetrics("demo", 3, ["car", "truck"])
    server.observe_request("/v1/models/{name}/predict", 200, 0.01)
    server.observe_request("/v2/models/{name}/infer", 500, 0.02)
    monitor = MonitorMetrics()
    monitor.update([("accuracy-low", _measurement(0.3, resolve=0.45))])
    exposed = {
        sample.name
        for text in (server.render(), monitor.render())
        for family in text_string_to_metric_families(text.decode())
        for sample in family.samples
    } | {"ALERTS"}
    text = export_rules(
        _config(tmp_path, [r.model_dump() for r in default_rules()] + SERVING_RULES)
    )
    named = {
        name
        for rule in _rules(text)
        for name in re.findall(r"\b(loopline_\w+|ALERTS)\b", rule["expr"])
    }
    assert named, text
    assert named <= exposed, named - exposed
    # the endpoints are the server's route templates; feedback and metadata are not counted
    for path in (
        "/v1/models/{name}/predict",
        "/v1/models/{name}/versions/{version}/predict",
        "/v2/models/{name}/infer",
        "/v2/models/{name}/versions/{version}/infer",
    ):
        assert re.fullmatch(prometheus.PREDICT_ENDPOINTS, path)
    assert not re.fullmatch(prometheus.PREDICT_ENDPOINTS, "/v1/feedback")


# -- validation -------------------------------------------------------------------------------
def _file(**rule: Any) -> str:
    return yaml.safe_dump(
        {"groups": [{"name": "g", "rules": [{"alert": "A", "expr": "up == 0", **rule}]}]}
    )


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("groups: {}", "groups must be a list"),
        ("rules: []", "one key, groups"),
        ("groups: [{rules: []}]", "needs a name"),
        ("groups: [{name: g, rules: []}, {name: g, rules: []}]", "repeats"),
        ("groups: [{name: g, rules: [{expr: up}]}]", "exactly one of alert and record"),
        (_file(expr="sum(rate(x[5m])"), "unclosed '('"),
        (_file(expr="rate(x[5m]))"), "unbalanced ')'"),
        (_file(expr="rate(x[5 minutes])"), "bad range"),
        (_file(expr="frobnicate(x) > 1"), "unknown function 'frobnicate'"),
        (_file(expr='x{job=~"a} > 1'), "unterminated string"),
        (_file(expr="x{job=a} > 1"), "bad label matcher"),
        (_file(**{"for": 90}), "not a duration"),
        (_file(**{"for": "90 seconds"}), "not a duration"),
        (_file(labels={"severity": 1}), "must be a string"),
        (_file(labels={"bad-name": "x"}), "invalid name"),
        (_file(annotations={"summary": "{{ $value"}), "template braces"),
        (_file(severity="critical"), "unknown field 'severity'"),
    ],
)
def test_broken_rule_files_are_rejected(text: str, problem: str) -> None:
    assert any(problem in p for p in check_rules(text)), check_rules(text)
    with pytest.raises(ConfigError, match="invalid Prometheus rules"):
        validate_rules(text)


def test_check_expr_accepts_what_prometheus_accepts() -> None:
    for expr in (
        'sum by (job) (rate(x{code=~"5..", a!="b"}[5m])) / on(job) group_left count(y) > 0.1',
        "max_over_time(x[1h:5m]) and absent(z) or vector(1)",
        'label_replace(x, "a", "$1", "b", "(.*)") unless x offset 5m',
        "time() - x > 60",
    ):
        assert check_expr(expr) == [], expr


# -- the monitor's exposition -----------------------------------------------------------------
def _measurement(
    value: float | None,
    *,
    scope: str = GLOBAL,
    version: int = 3,
    resolve: float | None = None,
    samples: int = 50,
) -> Measurement:
    evidence = {} if resolve is None else {"resolve_value": resolve, "resolve_samples": 100}
    return Measurement(
        metric="accuracy",
        environment="production",
        model_name="demo",
        model_version=version,
        scope=scope,
        value=value,
        samples=samples,
        window="last 50 labelled",
        evidence=evidence,
    )


def _samples(metrics: MonitorMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(metrics.render().decode())
        for s in f.samples
    }


def test_exposition_gauges_follow_the_passes() -> None:
    metrics = MonitorMetrics()
    metrics.update(
        [
            ("accuracy-low", _measurement(0.31, resolve=0.42)),
            ("accuracy-low", _measurement(None, scope="camera_id=cam-2", samples=12)),
        ],
        now=1000.0,
    )
    samples = _samples(metrics)
    labels = (
        ("environment", "production"),
        ("metric", "accuracy"),
        ("model", "demo"),
        ("rule", "accuracy-low"),
        ("scope", "global"),
        ("version", "3"),
    )
    cam2 = tuple(sorted({**dict(labels), "scope": "camera_id=cam-2"}.items()))
    assert samples[(exposition.METRIC, labels)] == pytest.approx(0.31)
    assert samples[(exposition.RESOLVE_METRIC, labels)] == pytest.approx(0.42)
    assert samples[(exposition.SAMPLES, labels)] == 50
    assert (exposition.METRIC, cam2) not in samples  # no-data: no series
    assert samples[(exposition.SAMPLES, cam2)] == 12
    assert samples[(exposition.LAST_PASS, ())] == 1000.0
    assert samples[("loopline_monitor_passes_total", ())] == 1

    # the next complete pass measured version 4 only: version 3's series are gone
    metrics.update([("accuracy-low", _measurement(0.9, version=4))], now=1005.0)
    samples = _samples(metrics)
    assert [dict(k[1])["version"] for k in samples if k[0] == exposition.METRIC] == ["4"]
    assert samples[("loopline_monitor_passes_total", ())] == 2
    # a partial update adds without dropping
    metrics.update([("accuracy-low", _measurement(0.5, version=5))], complete=False)
    versions = sorted(dict(k[1])["version"] for k in _samples(metrics) if k[0] == exposition.METRIC)
    assert versions == ["4", "5"]


def test_exposition_is_served_over_http() -> None:
    metrics = MonitorMetrics()
    metrics.update([("accuracy-low", _measurement(0.25))])
    server = metrics.serve(0)
    try:
        response = httpx.get(f"http://127.0.0.1:{server.server_port}/metrics", timeout=10)
    finally:
        server.shutdown()
        server.server_close()
    assert response.status_code == 200
    assert 'loopline_monitor_metric{environment="production",metric="accuracy"' in response.text


# -- promtool, where it is installed ----------------------------------------------------------
# `make test` unpacks Debian's promtool into .venv/bin; in CI it must be there.
needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None and os.environ.get("CI") != "true",
    reason="promtool is not on PATH (Prometheus is not installed; `make test` fetches it)",
)


def _series(name: str, values: str, **labels: str) -> dict[str, str]:
    inside = ", ".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{name}{{{inside}}}", "values": values}


@needs_promtool
def test_promtool_checks_the_export(tmp_path: Path) -> None:
    path = tmp_path / "rules.yml"
    path.write_text(
        export_rules(_config(tmp_path, [r.model_dump() for r in default_rules()] + SERVING_RULES))
    )
    done = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@needs_promtool
def test_promtool_unit_tests_the_rules_behaviour(tmp_path: Path) -> None:
    """Hysteresis (fires under 0.40, stays firing until the resolve window is back at 0.50),
    and the serving rules on counters and a histogram as the server writes them."""
    document = yaml.safe_load(
        export_rules(_config(tmp_path, [r.model_dump() for r in default_rules()] + SERVING_RULES))
    )
    for group in document["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)  # promtool compares them exactly: not the point here
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(document))
    series = {
        "metric": "accuracy",
        "environment": "production",
        "model": "demo",
        "version": "3",
        "scope": "global",
    }
    low = {**series, "rule": "accuracy-low", "severity": "critical", "action": "retrain"}
    mv = {"model": "demo", "version": "3"}
    predict = {**mv, "endpoint": "/v1/models/{name}/predict"}
    tests = {
        "rule_files": ["rules.yml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    # window value: fine, then under 0.40 (t=2..4), then 0.45 (t=5..12)
                    _series(
                        exposition.METRIC,
                        "0.9 0.9 0.3 0.3 0.3 " + "0.45 " * 8,
                        rule="accuracy-low",
                        **series,
                    ),
                    # resolve-window value: under 0.50 until t=8, then 0.6
                    _series(
                        exposition.RESOLVE_METRIC,
                        "0.9 0.9 " + "0.45 " * 7 + "0.6 " * 4,
                        rule="accuracy-low",
                        **series,
                    ),
                    _series("loopline_requests_total", "0+100x12", code="200", **predict),
                    _series("loopline_requests_total", "0+10x12", code="500", **predict),
                    _series("loopline_request_errors_total", "0+10x12", code="500", **predict),
                    _series(
                        "loopline_requests_total",
                        "0+1x12",
                        code="200",
                        **{**predict, "version": "4"},
                    ),  # too few requests for the rule
                    _series(
                        "loopline_request_errors_total",
                        "0+1x12",
                        code="500",
                        **{**predict, "version": "4"},
                    ),
                    *[
                        _series(
                            "loopline_request_duration_seconds_bucket", values, le=le, **predict
                        )
                        for le, values in (
                            ("0.5", "0+10x12"),
                            ("1.0", "0+110x12"),
                            ("+Inf", "0+110x12"),
                        )
                    ],
                ],
                "alert_rule_test": [
                    {"eval_time": "1m", "alertname": "LooplineAccuracyLow", "exp_alerts": []},
                    {
                        "eval_time": "3m",
                        "alertname": "LooplineAccuracyLow",
                        "exp_alerts": [{"exp_labels": low}],
                    },
                    # 0.45 over the window since t=5: no longer < 0.40, yet still firing
                    # (keep_firing_for alone would have let go by t=6)
                    {
                        "eval_time": "8m",
                        "alertname": "LooplineAccuracyLow",
                        "exp_alerts": [{"exp_labels": low}],
                    },
                    # resolve window back at 0.6 from t=9 (+1m keep_firing_for)
                    {"eval_time": "11m", "alertname": "LooplineAccuracyLow", "exp_alerts": []},
                    {
                        "eval_time": "5m",
                        "alertname": "LooplineErrorsHigh",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    **mv,
                                    "rule": "errors-high",
                                    "severity": "critical",
                                    "action": "none",
                                }
                            }
                        ],
                    },
                    {
                        "eval_time": "5m",
                        "alertname": "LooplineSlow",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    **mv,
                                    "rule": "slow",
                                    "severity": "warning",
                                    "action": "none",
                                }
                            }
                        ],
                    },
                ],
            }
        ],
    }
    (tmp_path / "tests.yml").write_text(yaml.safe_dump(tests))
    done = subprocess.run(
        ["promtool", "test", "rules", "tests.yml"], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_validate_uses_promtool_when_it_is_on_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stand-in promtool that rejects everything: validate_rules must run it and say so
    (the real one is exercised above where it is installed)."""
    fake = tmp_path / "promtool"
    fake.write_text("#!/bin/sh\necho \"$3: 1:1: group 'g': bad expression\" >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    with pytest.raises(ConfigError, match="promtool check rules failed: rules: 1:1"):
        validate_rules(export_rules(Config()))


def test_export_is_stable() -> None:
    assert export_rules(Config()) == export_rules(Config())  # no time or order in it

"""The monitor's rules as Prometheus alerting rules, for teams that alert in Prometheus.

``export_rules(config)`` writes a rule file equivalent to ``monitor.rules``:

- rules on Loopline's own metrics (accuracy, the CUSUM statistic, label-free estimates,
  drift, telemetry) compare ``loopline_monitor_metric{rule="..."}``, the gauge the monitor
  exposes (``monitor/exposition.py``), with the threshold. The monitor applies the window
  and the minimum sample (the series is absent under it); ``for:`` is the rule's pending
  period; a rule with hysteresis keeps firing, through Prometheus' own ``ALERTS`` series,
  until the resolve condition holds; ``keep_firing_for`` rides over a missed pass or scrape.
- ``serving.error_rate`` and ``serving.p95_ms`` read the prediction servers' own metrics
  (``deploy/metrics.py``): 5xx responses over requests of the predict and infer endpoints,
  and the 95th percentile of the request-latency histogram, in milliseconds, over the
  rule's ``window_s`` (default 5m) and only with at least ``min_samples`` requests.

``validate_rules(text)`` checks such a file: with ``promtool check rules`` when promtool is
on ``PATH`` (it is not installed with Loopline, nor on the machine this was written on),
and always by parsing it: the rule-file schema, durations, label names, template braces,
and each expression's brackets, label matchers, range durations and function names.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from loopline.errors import ConfigError
from loopline.monitor import exposition
from loopline.monitor.config import AlertRule

if TYPE_CHECKING:
    from loopline.config import Config

# The prediction server's metrics (deploy/metrics.py), as Prometheus names them.
REQUESTS = "loopline_requests_total"
REQUEST_ERRORS = "loopline_request_errors_total"
REQUEST_LATENCY_BUCKETS = "loopline_request_duration_seconds_bucket"
PREDICT_ENDPOINTS = ".*/(predict|infer)"  # route templates: /v1/.../predict, /v2/.../infer
SERVER_METRICS: tuple[str, ...] = ("serving.error_rate", "serving.p95_ms")
SERVING_WINDOW_S = 300.0
_BY = "environment, model, version"
_SERIES = "rule, environment, model, version, scope"


def duration(seconds: float) -> str:
    """A Prometheus duration: 90 -> ``1m30s``, 3600 -> ``1h``, 0.25 -> ``250ms``."""
    ms = round(seconds * 1000)
    if ms <= 0:
        return "0s"
    parts = []
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000), ("ms", 1)):
        count, ms = divmod(ms, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _string(value: str) -> str:
    """A PromQL string literal (JSON's escapes are Go's)."""
    return json.dumps(value)


def alert_name(rule_name: str) -> str:
    """``accuracy-low`` -> ``LooplineAccuracyLow`` (a valid metric name, as is customary)."""
    words = re.findall(r"[A-Za-z0-9]+", rule_name)
    return "Loopline" + "".join(w[:1].upper() + w[1:] for w in words)


def _window_text(rule: AlertRule) -> str:
    units = {"labelled": "labelled predictions", "unlabelled": "predictions"}
    unit = units.get(rule.kind, "samples")
    if rule.kind == "sequential":
        return f"the labelled predictions so far (CUSUM, p1 = {rule.cusum_p1})"
    parts = []
    if rule.window:
        parts.append(f"the last {rule.window} {unit}")
    if rule.window_s:
        parts.append(f"the last {duration(rule.window_s)}")
    return " within ".join(parts) or f"the latest {unit}"


def _resolve_at(rule: AlertRule) -> float:
    return rule.threshold if rule.resolve_threshold is None else rule.resolve_threshold


def _monitor_rule(rule: AlertRule, name: str) -> str:
    matcher = f"{{rule={_string(rule.name)}}}"
    expr = f"{exposition.METRIC}{matcher} {rule.op} {_number(rule.threshold)}"
    resolve_at = _resolve_at(rule)
    windowed = rule.resolve_window is not None and rule.resolve_window != rule.window
    if resolve_at == rule.threshold and not windowed:
        return expr
    resolve = exposition.RESOLVE_METRIC if windowed else exposition.METRIC
    firing = f'ALERTS{{alertname={_string(name)}, alertstate="firing"}}'
    return (
        f"({expr}) or ({resolve}{matcher} {rule.op} {_number(resolve_at)} "
        f"and on({_SERIES}) {firing})"
    )


def _server_rule(rule: AlertRule) -> str:
    window = duration(rule.window_s or SERVING_WINDOW_S)
    endpoints = f"endpoint=~{_string(PREDICT_ENDPOINTS)}"
    requests = f"sum by ({_BY}) (rate({REQUESTS}{{{endpoints}}}[{window}]))"
    count = f"sum by ({_BY}) (increase({REQUESTS}{{{endpoints}}}[{window}]))"
    if rule.metric == "serving.error_rate":
        errors = f'sum by ({_BY}) (rate({REQUEST_ERRORS}{{code=~"5..", {endpoints}}}[{window}]))'
        value = f"(({errors}) or ({requests} * 0)) / {requests}"
    else:
        buckets = f"sum by ({_BY}, le) (rate({REQUEST_LATENCY_BUCKETS}{{{endpoints}}}[{window}]))"
        value = f"histogram_quantile(0.95, {buckets}) * 1000"
    return f"{value} {rule.op} {_number(rule.threshold)} and {count} >= {rule.min_samples}"


def _annotations(rule: AlertRule, on_server: bool) -> dict[str, str]:
    where = "{{ $labels.environment }} {{ $labels.model }}:{{ $labels.version }}"
    if not on_server:
        where += " ({{ $labels.scope }})"
    value = '{{ $value | printf "%.4g" }}'
    if on_server:
        over = f"the last {duration(rule.window_s or SERVING_WINDOW_S)} of predict requests"
        what = "95th-percentile request latency (ms, from the histogram's buckets)"
        if rule.metric == "serving.error_rate":
            what = "5xx responses per request"
        sample = f"at least {rule.min_samples} requests"
    else:
        over, what = _window_text(rule), rule.metric
        sample = f"at least {rule.min_samples} samples"
    description = (
        f"{what} over {over} is {value}; Loopline rule {rule.name!r} fires when it is "
        f"{rule.op} {_number(rule.threshold)} ({sample}"
    )
    if rule.for_s:
        description += f", for {duration(rule.for_s)}"
    description += ")"
    if rule.resolve_threshold is not None or rule.resolve_window is not None:
        description += f" and resolves once it is no longer {rule.op} {_number(_resolve_at(rule))}"
        if rule.resolve_window:
            description += f" over the last {rule.resolve_window}"
    description += f". Action: {rule.action}"
    if rule.action == "approve":
        description += " (approve with `loopline approve ALERT_ID`; `loopline alerts` lists them)"
    elif rule.action == "retrain":
        description += " (`loopline monitor` runs the loop; `loopline alerts show ALERT_ID`)"
    return {
        "summary": f"{rule.metric} {rule.op} {_number(rule.threshold)} on {where}",
        "description": description + ".",
    }


def _rule(rule: AlertRule, name: str, interval_s: float) -> dict[str, Any]:
    on_server = rule.metric in SERVER_METRICS
    entry: dict[str, Any] = {
        "alert": name,
        "expr": _server_rule(rule) if on_server else _monitor_rule(rule, name),
    }
    if rule.for_s:
        entry["for"] = duration(rule.for_s)
    if not on_server:  # a missed pass or scrape must not resolve it
        entry["keep_firing_for"] = duration(max(60.0, 3 * interval_s))
    entry["labels"] = {"severity": rule.severity, "rule": rule.name, "action": rule.action}
    entry["annotations"] = _annotations(rule, on_server)
    return entry


def export_rules(config: Config) -> str:
    """A Prometheus rule file (YAML) equivalent to ``config.monitor.rules``, plus one rule
    that warns when the monitor's passes stop."""
    monitor = config.monitor
    names: set[str] = set()
    rules = []
    for rule in monitor.rules:
        name, n = alert_name(rule.name), 2
        while name in names:  # "a-b" and "a_b" would meet
            name, n = f"{alert_name(rule.name)}{n}", n + 1
        names.add(name)
        rules.append(_rule(rule, name, monitor.interval_s))
    stalled = max(60.0, 10 * monitor.interval_s)
    health = {
        "alert": "LooplineMonitorStalled",
        "expr": f"time() - {exposition.LAST_PASS} > {_number(stalled)}",
        "labels": {"severity": "warning"},
        "annotations": {
            "summary": f"the Loopline monitor has not completed a pass for {duration(stalled)}",
            "description": "alerts on loopline_monitor_metric are stale until "
            "`loopline monitor` runs again; last pass {{ $value | humanizeDuration }} ago.",
        },
    }
    document = {
        "groups": [
            {"name": f"loopline-{config.project}", "rules": rules},
            {"name": f"loopline-{config.project}-monitor", "rules": [health]},
        ]
    }
    header = (
        f"# Prometheus alerting rules for the Loopline project {config.project!r}, equivalent "
        "to monitor.rules in loopline.yaml.\n"
        "# Written by `loopline alerts export-prometheus`; scrape the monitor's metrics "
        f"({exposition.METRIC}) and the prediction servers' /metrics.\n"
    )
    body = yaml.safe_dump(
        document, sort_keys=False, default_flow_style=False, width=10_000, allow_unicode=True
    )
    return header + body


# -- validation -------------------------------------------------------------------------------
_DURATION = re.compile(r"^(\d+y)?(\d+w)?(\d+d)?(\d+h)?(\d+m)?(\d+s)?(\d+ms)?$")
_LABEL = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_METRIC_NAME = re.compile(r"^[A-Za-z_:][A-Za-z0-9_:]*$")
_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_MATCHER = re.compile(r'^\s*[A-Za-z_]\w*\s*(=~|!~|!=|=)\s*""\s*$')
_CALL = re.compile(r"([A-Za-z_:][\w:]*)\s*\(")
_NAMES = (
    "abs absent absent_over_time acos acosh asin asinh atan atanh avg_over_time ceil changes "
    "clamp clamp_max clamp_min cos cosh count_over_time day_of_month day_of_week day_of_year "
    "days_in_month deg delta deriv exp floor histogram_count histogram_fraction "
    "histogram_quantile histogram_stddev histogram_stdvar histogram_sum holt_winters hour "
    "idelta increase irate label_join label_replace last_over_time ln log10 log2 "
    "max_over_time min_over_time minute month pi predict_linear present_over_time "
    "quantile_over_time rad rate resets round scalar sgn sin sinh sort sort_desc sqrt "
    "stddev_over_time stdvar_over_time sum_over_time tan tanh time timestamp vector year "
    # aggregations, and the keywords a parenthesis may follow
    "sum min max avg group stddev stdvar count count_values bottomk topk quantile "
    "by without on ignoring group_left group_right and or unless bool"
)
FUNCTIONS = frozenset(_NAMES.split())
_GROUP_KEYS = {"name", "interval", "rules", "limit", "query_offset", "labels"}
_RULE_KEYS = {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}


def _is_duration(value: Any) -> bool:
    return isinstance(value, str) and value != "" and _DURATION.match(value) is not None


def check_expr(expr: str) -> list[str]:
    """What is wrong with a PromQL expression, as far as can be told without Prometheus:
    quotes, brackets, label matchers, range durations and function names."""
    problems: list[str] = []
    bare = _STRING.sub('""', expr)
    if any(q in bare.replace('""', "") for q in "\"'`"):
        return [f"unterminated string in {expr!r}"]
    if not bare.strip():
        return ["empty expression"]
    stack: list[tuple[str, int]] = []
    pairs = {")": "(", "]": "[", "}": "{"}
    for i, ch in enumerate(bare):
        if ch in "([{":
            stack.append((ch, i))
        elif ch in pairs:
            if not stack or stack[-1][0] != pairs[ch]:
                return [f"unbalanced {ch!r} at {i} in {expr!r}"]
            opening, start = stack.pop()
            inside = bare[start + 1 : i]
            if opening == "{" and inside.strip():
                bad = [m for m in inside.split(",") if m.strip() and not _MATCHER.match(m)]
                problems += [f"bad label matcher {m.strip()!r} in {expr!r}" for m in bad]
            if opening == "[":
                start_, _, step = inside.partition(":")
                if not _is_duration(start_.strip()) or (
                    step.strip() and not _is_duration(step.strip())
                ):
                    problems.append(f"bad range [{inside}] in {expr!r}")
    if stack:
        return [f"unclosed {stack[-1][0]!r} in {expr!r}"]
    for call in _CALL.findall(bare):
        if call not in FUNCTIONS:
            problems.append(f"unknown function {call!r} in {expr!r}")
    return problems


def _check_template(where: str, text: str) -> list[str]:
    rest = re.sub(r"\{\{.*?\}\}", "", text, flags=re.S)
    return [f"{where}: unbalanced template braces"] if "{{" in rest or "}}" in rest else []


def _check_map(where: str, value: Any, key_pattern: re.Pattern[str]) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, dict):
        return [f"{where} must be a mapping"]
    problems = []
    for key, text in value.items():
        if not isinstance(key, str) or not key_pattern.match(key):
            problems.append(f"{where}: invalid name {key!r}")
        elif not isinstance(text, str):
            problems.append(f"{where}.{key} must be a string, not {type(text).__name__}")
        else:
            problems += _check_template(f"{where}.{key}", text)
    return problems


def _check_rule(where: str, rule: Any) -> list[str]:
    if not isinstance(rule, dict):
        return [f"{where} must be a mapping"]
    problems = [f"{where}: unknown field {k!r}" for k in rule if k not in _RULE_KEYS]
    alert, record = rule.get("alert"), rule.get("record")
    if (alert is None) == (record is None):
        problems.append(f"{where}: needs exactly one of alert and record")
    elif alert is not None and not (isinstance(alert, str) and alert):
        problems.append(f"{where}: alert must be a non-empty string")
    elif record is not None and not (isinstance(record, str) and _METRIC_NAME.match(record)):
        problems.append(f"{where}: record must be a metric name")
    if record is not None and any(k in rule for k in ("for", "keep_firing_for", "annotations")):
        problems.append(f"{where}: a recording rule takes no for, keep_firing_for or annotations")
    name = f"{where} ({alert or record})"
    expr = rule.get("expr")
    if not isinstance(expr, str | int | float) or isinstance(expr, bool):
        problems.append(f"{name}: expr must be a string")
    else:
        problems += [f"{name}: {p}" for p in check_expr(str(expr))]
    for key in ("for", "keep_firing_for"):
        if key in rule and not _is_duration(rule[key]):
            problems.append(f"{name}: {key} {rule[key]!r} is not a duration such as 1m30s")
    problems += _check_map(f"{name} labels", rule.get("labels"), _LABEL)
    problems += _check_map(f"{name} annotations", rule.get("annotations"), _LABEL)
    return problems


def check_rules(text: str) -> list[str]:
    """The problems in a Prometheus rule file, found by parsing it (empty: none found)."""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as err:
        return [f"not YAML: {err}".replace("\n", " ")]
    if not isinstance(document, dict) or set(document) != {"groups"}:
        return ["a rule file is a mapping with one key, groups"]
    groups = document["groups"]
    if not isinstance(groups, list):
        return ["groups must be a list"]
    problems: list[str] = []
    seen: set[str] = set()
    for i, group in enumerate(groups):
        where = f"groups[{i}]"
        if not isinstance(group, dict):
            problems.append(f"{where} must be a mapping")
            continue
        problems += [f"{where}: unknown field {k!r}" for k in group if k not in _GROUP_KEYS]
        name = group.get("name")
        if not isinstance(name, str) or not name:
            problems.append(f"{where}: needs a name")
        elif name in seen:
            problems.append(f"{where}: group name {name!r} repeats")
        seen.add(str(name))
        if "interval" in group and not _is_duration(group["interval"]):
            problems.append(f"{where}: interval {group['interval']!r} is not a duration")
        rules = group.get("rules")
        if not isinstance(rules, list):
            problems.append(f"{where}: rules must be a list")
            continue
        for j, rule in enumerate(rules):
            problems += _check_rule(f"{where}.rules[{j}]", rule)
    return problems


def validate_rules(text: str) -> None:
    """Raise ConfigError unless ``text`` is a valid Prometheus rule file.

    Always parses and checks it (``check_rules``); then, when ``promtool`` is on ``PATH``,
    runs ``promtool check rules`` on it too, which parses every expression with Prometheus'
    own parser. promtool is not a Loopline dependency (and not installed where Loopline's
    tests usually run), so without it the parse check is the whole check.
    """
    problems = check_rules(text)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ConfigError("invalid Prometheus rules: " + "; ".join(problems[:3]) + more)
    promtool = shutil.which("promtool")
    if promtool is None:
        return
    with tempfile.TemporaryDirectory(prefix="loopline-rules-") as tmp:
        path = Path(tmp) / "rules.yml"
        path.write_text(text)
        done = subprocess.run(
            [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
        )
    if done.returncode != 0:
        output = " ".join((done.stdout + done.stderr).replace(str(path), "rules").split())
        raise ConfigError(f"promtool check rules failed: {output[:500]}")

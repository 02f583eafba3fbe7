"""Health rules on device and serving telemetry: the same lifecycle as any other metric.

``telemetry.<key>`` reads the telemetry table (what edge devices report over HTTP and
MQTT): per device of the environment running this model, the mean of ``metrics[key]`` over the last
``window_s`` seconds and/or the last ``window`` samples (the latest sample when neither is
set). A per-segment rule gets one scope per device (``device=<id>``); a global rule the
worst device (highest for ``>``/``>=`` rules, lowest for ``<``/``<=``), named in the
evidence. Samples of another version of the model are left out (a canary's devices are
measured with the canary), samples that carry no version are kept.

``serving.<key>`` reads what the environment's replicas report in their heartbeat
(``stats["versions"][version]``): ``error_rate`` is errors over requests summed over the
replicas, ``p95_ms`` (and any ``*_ms``) the worst replica's, any other counter the sum.
Replicas not seen for ``window_s`` (default 60 s) are left out. A per-segment rule gets
one scope per replica (``replica=<id>``).

Either is no-data (value None) with fewer than ``min_samples`` samples (telemetry
samples, or requests for serving).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from loopline.monitor.types import GLOBAL, Measurement, scope_name

if TYPE_CHECKING:
    from loopline.monitor.config import AlertRule, MonitorConfig
    from loopline.monitor.types import VersionView

REPLICA_SEEN_S = 60.0


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _parse(at: str | None) -> datetime | None:
    if at is None:
        return None
    ts = datetime.fromisoformat(at)
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts


def _worst_high(rule: AlertRule) -> bool:
    return rule.op in (">", ">=")


def _window_text(rule: AlertRule) -> str:
    parts = []
    if rule.window is not None:
        parts.append(f"last {rule.window}")
    if rule.window_s is not None:
        parts.append(f"{rule.window_s:g}s")
    return " within ".join(parts) if parts else "latest"


def measure(
    rule: AlertRule, view: VersionView, state: dict[str, Any], config: MonitorConfig
) -> list[Measurement]:
    """``telemetry.<key>`` or ``serving.<key>`` for ``view``'s version (``state`` unused)."""
    if rule.metric.startswith("serving."):
        return _serving(rule, view)
    return _telemetry(rule, view)


def _telemetry(rule: AlertRule, view: VersionView) -> list[Measurement]:
    key = rule.metric.split(".", 1)[1]
    now = view.now
    since = now - timedelta(seconds=rule.window_s) if rule.window_s is not None else None
    limit = rule.window if rule.window is not None else (None if since is not None else 1)
    means: dict[str, tuple[float, int]] = {}
    for device in view.store.devices.list(view.environment):
        if device.get("model_name") not in (None, view.model_name):
            continue
        device_id = str(device["device_id"])
        rows = view.store.devices.telemetry(view.environment, device_id, since=since, limit=limit)
        values = []
        for row in rows:
            at = _parse(row.get("at"))
            version = row.get("version")
            if (at is not None and at > now) or version not in (None, view.model_version):
                continue
            value = _number((row.get("metrics") or {}).get(key))
            if value is not None:
                values.append(value)
        if values:
            means[device_id] = (sum(values) / len(values), len(values))
    window = f"telemetry {_window_text(rule)}"
    if rule.scope == "segment":
        return [
            _measurement(rule, view, scope_name("device", d), mean, n, window, {"device": d})
            for d, (mean, n) in means.items()
        ]
    return [_worst(rule, view, means, "device", window)]


def _worst(
    rule: AlertRule,
    view: VersionView,
    values: dict[str, tuple[float, int]],
    noun: str,
    window: str,
) -> Measurement:
    """The global measurement: the worst member with enough samples."""
    enough = {k: v for k, v in values.items() if v[1] >= rule.min_samples}
    evidence: dict[str, Any] = {
        f"per_{noun}": {k: {"value": v, "samples": n} for k, (v, n) in values.items()}
    }
    if not enough:
        samples = max((n for _, n in values.values()), default=0)
        return Measurement(rule.metric, view.environment, view.model_name, view.model_version,
                           GLOBAL, None, samples, window, evidence)  # fmt: skip
    pick = max if _worst_high(rule) else min
    member = pick(enough, key=lambda k: enough[k][0])
    value, samples = enough[member]
    evidence[noun] = member
    return Measurement(rule.metric, view.environment, view.model_name, view.model_version,
                       GLOBAL, value, samples, window, evidence)  # fmt: skip


def _measurement(
    rule: AlertRule,
    view: VersionView,
    scope: str,
    value: float | None,
    samples: int,
    window: str,
    evidence: dict[str, Any],
) -> Measurement:
    if samples < rule.min_samples:
        value = None
    return Measurement(rule.metric, view.environment, view.model_name, view.model_version,
                       scope, value, samples, window, evidence)  # fmt: skip


def _serving(rule: AlertRule, view: VersionView) -> list[Measurement]:
    key = rule.metric.split(".", 1)[1]
    seen = rule.window_s if rule.window_s is not None else REPLICA_SEEN_S
    replicas = view.store.deployments.replicas(view.environment, seen_within_s=seen)
    per_replica: dict[str, dict[str, Any]] = {}
    for replica in replicas:
        counters = (replica.stats.get("versions") or {}).get(str(view.model_version))
        if counters:
            per_replica[replica.replica_id] = dict(counters)
    window = f"serving, replicas seen within {seen:g}s"
    if rule.scope == "segment":
        out = []
        for rid, counters in sorted(per_replica.items()):
            value, samples = _combine(key, [counters])
            out.append(_measurement(rule, view, scope_name("replica", rid), value, samples,
                                    window, {"replica": rid, "counters": counters}))  # fmt: skip
        return out
    value, samples = _combine(key, list(per_replica.values()))
    evidence: dict[str, Any] = {"replicas": per_replica}
    return [_measurement(rule, view, GLOBAL, value, samples, window, evidence)]


def _combine(key: str, counters: list[dict[str, Any]]) -> tuple[float | None, int]:
    """One replica set's value of ``key`` and its sample count (requests)."""
    requests = sum(int(_number(c.get("requests")) or 0) for c in counters)
    if key == "error_rate":
        errors = sum(int(_number(c.get("errors")) or 0) for c in counters)
        return (errors / requests if requests else None), requests
    values = [v for v in (_number(c.get(key)) for c in counters) if v is not None]
    if not values:
        return None, requests
    if key.endswith("_ms"):  # latencies: the worst replica's
        return max(values), requests
    return sum(values), requests

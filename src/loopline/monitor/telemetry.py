"""Health rules on device and serving telemetry: the same lifecycle as any other metric.

Devices and replicas report per environment, not per version: a pass measures these rules
once per environment, on the stable version's view, and the candidate of a canary is judged
by the canary's own verdict (``deploy.canary``), not here.

``telemetry.<key>`` reads the telemetry table (what edge devices report over HTTP and
MQTT): per device of the environment running this model, the mean of ``metrics[key]`` over
the last ``window_s`` seconds and/or the last ``window`` samples (the latest sample when
neither is set). A per-segment rule gets one scope per device (``device=<id>``); a global
rule the worst device (highest for ``>``/``>=`` rules, lowest for ``<``/``<=``), named in
the evidence. Samples tagged with another version of the model are skipped (a device
still on the old version, or one running a canary's candidate); samples that carry no
version are kept. One read of the environment's samples per rule, whatever the number of
devices.

``serving.<key>`` reads what the environment's replicas report in their heartbeat
(``stats["versions"][version]``, counters since the replica took its generation). Only
replicas of the deployment's current generation count (as ``canary.version_totals``), and
only what they counted since the last pass that measured: the rule's ``state`` keeps each
replica's counters as of then, and a replica that restarted (another pid, or counters that
went down) counts all it has. ``error_rate`` is errors over requests summed over the
replicas, ``p95_ms`` (and any ``*_ms``, a gauge over the replica's recent requests) the
worst replica's among those that answered requests since, any other counter the sum.
Replicas not seen for ``window_s`` (default 60 s) are left out. A per-segment rule gets
one scope per replica (``replica=<id>``).

Either is no-data (value None) with fewer than ``min_samples`` samples (telemetry samples,
or requests since the last measurement for serving). While a serving rule is no-data its
counters as of the last measurement are kept, so a quiet service accumulates requests over
passes until there are enough.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from loopline.clock import parse
from loopline.monitor.types import GLOBAL, Measurement, describe_window, scope_name

if TYPE_CHECKING:
    from loopline.monitor.config import AlertRule, MonitorConfig
    from loopline.monitor.types import VersionView

REPLICA_SEEN_S = 60.0
Rows = list[dict[str, Any]]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _worst_high(rule: AlertRule) -> bool:
    return rule.op in (">", ">=")


def measure(
    rule: AlertRule, view: VersionView, state: dict[str, Any], config: MonitorConfig
) -> list[Measurement]:
    """``telemetry.<key>`` or ``serving.<key>`` for ``view``'s version; ``state`` keeps the
    replicas' counters between passes (serving rules only)."""
    if rule.metric.startswith("serving."):
        return _serving(rule, view, state)
    return _telemetry(rule, view)


def _device_samples(
    view: VersionView, devices: list[str], since: datetime | None, per_device: int | None
) -> dict[str, Rows]:
    """The samples of ``devices``, oldest first: all since ``since``, at most the latest
    ``per_device`` of each. One read of the environment's samples; only when that read was
    cut off by its limit before a device had its ``per_device``, that device is read alone."""
    tel = view.store.devices.telemetry
    wanted = set(devices)
    limit = None if per_device is None else per_device * max(1, len(devices))
    rows = tel(view.environment, since=since, limit=limit)
    out: dict[str, Rows] = defaultdict(list)
    for row in rows:
        if row["device_id"] in wanted:
            out[row["device_id"]].append(row)
    if per_device is None:
        return out
    for device in devices:
        if len(out[device]) > per_device:
            out[device] = out[device][-per_device:]
        elif limit is not None and len(rows) >= limit and len(out[device]) < per_device:
            out[device] = tel(view.environment, device, since=since, limit=per_device)
    return out


def _telemetry(rule: AlertRule, view: VersionView) -> list[Measurement]:
    key = rule.metric.split(".", 1)[1]
    now = view.now
    since = now - timedelta(seconds=rule.window_s) if rule.window_s is not None else None
    per_device = rule.window if rule.window is not None else (None if since is not None else 1)
    devices = [
        str(d["device_id"])
        for d in view.store.devices.list(view.environment)
        if d.get("model_name") in (None, view.model_name)
    ]
    means: dict[str, tuple[float, int]] = {}
    for device_id, rows in _device_samples(view, devices, since, per_device).items():
        values = []
        for row in rows:
            stamp = row.get("at")
            at = parse(stamp) if stamp is not None else None
            version = row.get("version")
            if (at is not None and at > now) or version not in (None, view.model_version):
                continue
            value = _number((row.get("metrics") or {}).get(key))
            if value is not None:
                values.append(value)
        if values:
            means[device_id] = (sum(values) / len(values), len(values))
    window = f"telemetry {describe_window(rule.window, rule.window_s)}"
    if rule.scope == "segment":
        return [
            _measurement(rule, view, scope_name("device", d), mean, n, window, {"device": d})
            for d, (mean, n) in sorted(means.items())
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
        return Measurement.of(rule, view, GLOBAL, None, samples, window, evidence)
    pick = max if _worst_high(rule) else min
    member = pick(enough, key=lambda k: enough[k][0])
    value, samples = enough[member]
    evidence[noun] = member
    return Measurement.of(rule, view, GLOBAL, value, samples, window, evidence)


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
    return Measurement.of(rule, view, scope, value, samples, window, evidence)


# -- serving counters ---------------------------------------------------------------------
def _counts(counters: dict[str, Any]) -> dict[str, int]:
    """The monotonic counters of a replica's version stats (everything but ``*_ms``)."""
    out: dict[str, int] = {}
    for k, v in counters.items():
        number = _number(v)
        if number is not None and not k.endswith("_ms"):
            out[k] = int(number)
    return out


def _delta(now: dict[str, int], base: dict[str, Any] | None, pid: int | None) -> dict[str, int]:
    """What a replica counted since ``base`` (its counters at the last measurement); all of
    ``now`` when there is none, or the replica restarted (another pid, or a counter went
    down)."""
    if not base or (pid is not None and base.get("pid") not in (None, pid)):
        return dict(now)
    before: dict[str, Any] = base.get("counters") or {}
    if any(v < int(before.get(k) or 0) for k, v in now.items()):
        return dict(now)
    return {k: v - int(before.get(k) or 0) for k, v in now.items()}


def _serving(rule: AlertRule, view: VersionView, state: dict[str, Any]) -> list[Measurement]:
    key = rule.metric.split(".", 1)[1]
    seen = rule.window_s if rule.window_s is not None else REPLICA_SEEN_S
    dep = view.store.deployments.get(view.environment)
    generation = dep.generation if dep is not None else None
    saved: dict[str, Any] = state.get("replicas") or {}
    # Baselines of another generation say nothing about this one's counters.
    bases = {rid: b for rid, b in saved.items() if b.get("generation") == generation}
    now_at = view.now.isoformat()
    current: dict[str, dict[str, Any]] = {}  # rid -> this pass's counters, for the baseline
    deltas: dict[str, dict[str, Any]] = {}  # rid -> since its baseline, plus its gauges
    replicas = view.store.deployments.replicas(view.environment, seen_within_s=seen)
    for replica in replicas:
        if generation is None or replica.generation != generation:
            continue
        counters = (replica.stats.get("versions") or {}).get(str(view.model_version))
        if not counters:
            continue
        rid, counts = replica.replica_id, _counts(counters)
        current[rid] = {"generation": generation, "pid": replica.pid, "counters": counts,
                        "at": now_at}  # fmt: skip
        delta: dict[str, Any] = _delta(counts, bases.get(rid), replica.pid)
        if delta.get("requests", 0) > 0:  # gauges of a replica that answered since
            delta.update({k: v for k, v in counters.items() if k.endswith("_ms")})
        deltas[rid] = delta
    window = f"serving since the last measurement, generation {generation}, seen within {seen:g}s"

    def since(rids: list[str]) -> str | None:
        times = [str(bases[r].get("at")) for r in rids if r in bases and bases[r].get("at")]
        return min(times) if times else None

    out: list[Measurement] = []
    evidence: dict[str, Any]
    if rule.scope == "segment":
        for rid, delta in sorted(deltas.items()):
            value, samples = _combine(key, [delta])
            evidence = {"replica": rid, "counters": delta, "since": since([rid])}
            scope = scope_name("replica", rid)
            out.append(_measurement(rule, view, scope, value, samples, window, evidence))
            if samples >= rule.min_samples:
                bases[rid] = current[rid]
    else:
        value, samples = _combine(key, list(deltas.values()))
        evidence = {"replicas": deltas, "generation": generation, "since": since(list(deltas))}
        out.append(_measurement(rule, view, GLOBAL, value, samples, window, evidence))
        if samples >= rule.min_samples:
            bases.update(current)
    state["replicas"] = bases
    return out


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

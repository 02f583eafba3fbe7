"""Judging a running canary (and reporting a shadow) from what the replicas saw.

Each serving replica reports, with its heartbeat, counters per version it serves since it
took the deployment's current generation (``stats["versions"][str(version)]``)::

    {"requests": 812, "errors": 0, "fallbacks": 0, "p95_ms": 9.1,
     "shadow_compared": 0, "shadow_agreed": 0, "shadow_errors": 0, "shadow_p95_ms": null}

``errors`` counts requests the version failed (a canary's failures are answered again by
the stable version, so no client sees them: ``fallbacks``). Accuracy comes from the
prediction log joined with feedback since the canary started.

``judge`` turns that into a verdict; ``act`` applies it with compare-and-set on the
generation it judged, so a verdict about a state that has changed meanwhile is dropped.
Any process may call ``act``: the serving replicas do, every reconcile interval, and so
can the monitor; concurrent callers make exactly one transition.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from loopline.drivers.metadata.deployments import DeploymentConflict, DeploymentState

if TYPE_CHECKING:
    from loopline.drivers.metadata.store import MetadataStore
    from loopline.environments import EnvironmentConfig

MIN_REQUESTS_TO_JUDGE = 20  # fewer requests say nothing about an error rate or a p95
COUNTERS = ("requests", "errors", "fallbacks", "shadow_compared", "shadow_agreed", "shadow_errors")


@dataclass
class Verdict:
    """``action`` is "promote", "rollback" or None (keep watching)."""

    action: str | None
    reason: str
    evidence: dict[str, Any] = field(default_factory=dict)


def version_totals(
    store: MetadataStore, state: DeploymentState, *, seen_within_s: float = 30.0
) -> dict[int, dict[str, Any]]:
    """Counters per version summed over the replicas serving ``state``'s generation."""
    totals: dict[int, dict[str, Any]] = {}
    for replica in store.deployments.replicas(state.environment, seen_within_s=seen_within_s):
        if replica.generation != state.generation:
            continue
        for key, counters in (replica.stats.get("versions") or {}).items():
            acc = totals.setdefault(int(key), {c: 0 for c in COUNTERS})
            for c in COUNTERS:
                acc[c] += int(counters.get(c) or 0)
            for c in ("p95_ms", "shadow_p95_ms"):  # the worst replica's
                value = counters.get(c)
                if value is not None:
                    acc[c] = max(float(value), float(acc.get(c) or 0.0))
    return totals


def judge(
    store: MetadataStore,
    state: DeploymentState,
    env: EnvironmentConfig,
    *,
    reference_accuracy: float | None = None,
) -> Verdict:
    """What to do with the canary of ``state`` under ``env``'s canary policy."""
    if state.candidate_version is None or state.strategy != "canary":
        return Verdict(None, "no canary running")
    policy = env.canary
    cand, stable = state.candidate_version, state.stable_version
    totals = version_totals(store, state, seen_within_s=max(30.0, 10 * env.reconcile_interval_s))
    c = totals.get(cand, {c: 0 for c in COUNTERS})
    requests, errors = int(c["requests"]), int(c["errors"])
    evidence: dict[str, Any] = {"candidate": c, "stable": totals.get(stable or -1, {})}
    if requests >= MIN_REQUESTS_TO_JUDGE:
        rate = errors / requests
        if rate > policy.max_error_rate:
            return Verdict(
                "rollback",
                f"error rate {rate:.3f} over {requests} requests is above "
                f"{policy.max_error_rate:.3f}",
                evidence,
            )
        p95 = c.get("p95_ms")
        if p95 is not None and p95 > policy.max_p95_ms:
            return Verdict(
                "rollback",
                f"p95 latency {p95:.1f} ms is above the budget of {policy.max_p95_ms:.0f} ms",
                evidence,
            )
    n_c = 0
    if state.candidate_since is not None and state.model_name is not None:
        labelled = store.predictions.labelled_accuracy(
            environment=state.environment,
            model_name=state.model_name,
            since=state.candidate_since,
            versions=[v for v in (stable, cand) if v is not None],
        )
        n_c, ok_c = labelled.get(cand, (0, 0))
        evidence["labelled"] = {str(k): list(v) for k, v in labelled.items()}
        if n_c >= policy.min_labels:
            acc_c = ok_c / n_c
            n_s, ok_s = labelled.get(stable or -1, (0, 0))
            baseline = ok_s / n_s if n_s >= policy.min_labels else reference_accuracy
            if baseline is not None and acc_c < baseline - policy.max_accuracy_drop:
                return Verdict(
                    "rollback",
                    f"accuracy {acc_c:.3f} on {n_c} labelled requests is more than "
                    f"{policy.max_accuracy_drop:.2f} below the stable version's {baseline:.3f}",
                    evidence,
                )
    if requests >= policy.min_requests:
        if policy.promote_needs_labels and n_c < policy.min_labels:
            return Verdict(
                None,
                f"healthy after {requests} requests; waiting for feedback on "
                f"{policy.min_labels} of its answers ({n_c} so far)",
                evidence,
            )
        if not policy.auto_promote:
            return Verdict(None, f"healthy after {requests} requests; waiting for a person")
        return Verdict("promote", f"healthy after {requests} requests ({errors} errors)", evidence)
    return Verdict(None, f"watching: {requests} of {policy.min_requests} requests", evidence)


def reference_accuracy(store: MetadataStore, name: str, version: int | None) -> float | None:
    """The accuracy a version was registered with (its test split), if known."""
    if version is None:
        return None
    try:
        metrics = store.models.get(name, version).metrics or {}
    except Exception:
        return None
    value = metrics.get("accuracy")
    return float(value) if isinstance(value, int | float) else None


def act(
    store: MetadataStore, environment: str, env: EnvironmentConfig
) -> tuple[DeploymentState | None, Verdict]:
    """Judge the environment's canary and apply the verdict; (new state or None, verdict)."""
    state = store.deployments.get(environment)
    if state is None or state.candidate_version is None or state.strategy != "canary":
        return None, Verdict(None, "no canary running")
    assert state.model_name is not None
    verdict = judge(
        store,
        state,
        env,
        reference_accuracy=reference_accuracy(store, state.model_name, state.stable_version),
    )
    if verdict.action is None:
        return None, verdict
    if verdict.action == "promote":
        changes: dict[str, Any] = {
            "stable_version": state.candidate_version,
            "previous_version": state.stable_version,
        }
    else:
        changes = {}
    changes.update(
        candidate_version=None,
        strategy="direct",
        candidate_share=0.0,
        candidate_since=None,
        status="pending",
    )
    try:
        new = store.deployments.change(
            environment,
            expected_generation=state.generation,
            action=f"auto-{verdict.action}",
            actor="loopline (canary)",
            reason=f"{state.ref(state.candidate_version)}: {verdict.reason}",
            **changes,
        )
    except DeploymentConflict:  # someone (another replica, a person) acted first
        return None, verdict
    return new, verdict


def shadow_report(store: MetadataStore, state: DeploymentState) -> dict[str, Any]:
    """Agreement and latency of a shadow candidate against production, so far."""
    if state.candidate_version is None or state.strategy != "shadow":
        return {}
    totals = version_totals(store, state)
    cand = totals.get(state.candidate_version, {})
    stable = totals.get(state.stable_version or -1, {})
    compared = int(cand.get("shadow_compared") or 0)
    agreed = int(cand.get("shadow_agreed") or 0)
    return {
        "candidate": state.ref(state.candidate_version),
        "stable": state.ref(state.stable_version),
        "compared": compared,
        "agreed": agreed,
        "agreement": agreed / compared if compared else None,
        "shadow_errors": int(cand.get("shadow_errors") or 0),
        "candidate_p95_ms": cand.get("shadow_p95_ms"),
        "stable_p95_ms": stable.get("p95_ms"),
        "stable_requests": int(stable.get("requests") or 0),
    }

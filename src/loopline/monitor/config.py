"""The ``monitor:`` section of ``loopline.yaml``: what is watched, alert rules, channels, and
what the loop does when an alert fires.

For example::

    monitor:
      environments: [production]
      interval_s: 5
      segments: [camera_id]
      owner: qa@example.com
      channels:
        - {kind: webhook, url: "${QA_WEBHOOK_URL}"}
        - {kind: email, host: smtp.example.com, port: 587, sender: loopline@example.com,
           to: [qa@example.com], username: loopline, password: "${SMTP_PASSWORD}"}
      rules:
        - {name: accuracy-low, metric: accuracy, op: "<", threshold: 0.40, window: 50,
           min_samples: 30, severity: critical, action: retrain,
           resolve_threshold: 0.50, resolve_window: 100}

Nothing here knows about vehicles: metrics are computed from the prediction log and its
feedback, segments are request-metadata columns, and the retrain action runs the project's
own Build pipeline.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Severity = Literal["info", "warning", "critical"]
SEVERITIES: tuple[str, ...] = ("info", "warning", "critical")
Action = Literal["retrain", "notify", "approve", "none"]
ACTIONS: tuple[str, ...] = ("retrain", "notify", "approve", "none")
Op = Literal["<", "<=", ">", ">="]

# Metrics over a window of labelled predictions (the log joined with its feedback).
LABELLED_METRICS: tuple[str, ...] = ("accuracy", "macro_precision", "macro_recall", "macro_f1")
# The sequential early warning on the same labelled stream (a Bernoulli CUSUM statistic).
SEQUENTIAL_METRICS: tuple[str, ...] = ("cusum",)
# Label-free: over a window of logged predictions, before any label arrives.
UNLABELLED_METRICS: tuple[str, ...] = (
    "estimated_accuracy",  # confidence-based, calibrated on the validation split
    "drift.predictions",  # predicted-class distribution against the reference
    "drift.inputs",  # image statistics (brightness, contrast, sharpness, ...)
    "drift.softmax",  # each softmax column (KS)
)
# ``telemetry.<key>``: a device's or server's reported number (temperature_c, cpu_percent,
# latency_ms, ...), per device; ``serving.<key>``: the replicas' counters (error_rate, p95_ms).
TELEMETRY_PREFIXES: tuple[str, ...] = ("telemetry.", "serving.")
_KEY = re.compile(r"^[A-Za-z_][\w\-]*$")


def metric_kind(metric: str) -> str:
    """``labelled``, ``sequential``, ``unlabelled`` or ``telemetry`` for a rule's metric."""
    if metric in LABELLED_METRICS:
        return "labelled"
    if metric in SEQUENTIAL_METRICS:
        return "sequential"
    if metric in UNLABELLED_METRICS:
        return "unlabelled"
    for prefix in TELEMETRY_PREFIXES:
        if metric.startswith(prefix) and _KEY.match(metric[len(prefix) :]):
            return "telemetry"
    raise ValueError(
        f"unknown metric {metric!r}; use one of "
        + ", ".join(LABELLED_METRICS + SEQUENTIAL_METRICS + UNLABELLED_METRICS)
        + ", telemetry.<key> or serving.<key>"
    )


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _is_reference(value: str) -> bool:
    """Whether ``value`` is wholly an ``${ENV}`` reference (expanded only when sending)."""
    return value.startswith("${") and value.endswith("}") and len(value) > 3


class AlertRule(_Section):
    """One alert rule: ``metric op threshold`` over a window, with its lifecycle settings.

    The alert is *no-data* while the window holds fewer than ``min_samples``, *pending*
    once the condition holds, *firing* once it has held for ``for_s`` seconds, and
    *resolved* once the resolve condition holds (``resolve_threshold`` over
    ``resolve_window``: hysteresis, so it does not flap). One alert per (rule, version,
    scope) is open at a time.
    """

    name: str = Field(description="unique among the rules; alerts are named after it")
    metric: str
    op: Op = "<"
    threshold: float
    window: int | None = Field(
        None, ge=1, description="the last N samples (labelled predictions for labelled metrics)"
    )
    window_s: float | None = Field(None, gt=0.0, description="or the last N seconds")
    min_samples: int = Field(30, ge=1, description="fewer: no-data")
    for_s: float = Field(0.0, ge=0.0, description="pending this long before firing")
    cooldown_s: float = Field(
        600.0, ge=0.0, description="after an alert of this rule resolves, wait before the next"
    )
    severity: Severity = "warning"
    scope: Literal["global", "segment"] = "global"
    segment_by: list[str] | None = Field(
        None, description="segment columns for scope: segment (default monitor.segments)"
    )
    action: Action = "none"
    resolve_threshold: float | None = Field(None, description="default: threshold")
    resolve_window: int | None = Field(None, ge=1, description="default: window")
    # cusum only: the accuracy it watches for (p1); p0 is the version's reference accuracy.
    cusum_p1: float = Field(0.40, gt=0.0, lt=1.0)

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, value: str) -> str:
        metric_kind(value)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> AlertRule:
        kind = metric_kind(self.metric)
        # approve retrains too (once a person says so): only labelled metrics may.
        if kind != "labelled" and self.action in ("retrain", "approve"):
            raise ValueError(
                f"rule {self.name!r}: {self.metric} is a warning signal; it may notify "
                f"(action: notify or none) but never {self.action}: retrain on a labelled "
                "metric such as accuracy"
            )
        if kind == "labelled" and self.window is None and self.window_s is None:
            self.window = 50
        return self

    @property
    def kind(self) -> str:
        return metric_kind(self.metric)


def default_rules() -> list[AlertRule]:
    """The rules a project gets without a ``monitor.rules`` section."""
    return [
        AlertRule(
            name="accuracy-low",
            metric="accuracy",
            op="<",
            threshold=0.40,
            window=50,
            min_samples=30,
            severity="critical",
            action="retrain",
            resolve_threshold=0.50,
            resolve_window=100,
        ),
        AlertRule(
            name="accuracy-collapse",
            metric="cusum",
            op=">",
            threshold=12.0,
            min_samples=1,
            severity="warning",
            action="notify",
            cooldown_s=600.0,
        ),
        AlertRule(
            name="estimated-accuracy-low",
            metric="estimated_accuracy",
            op="<",
            threshold=0.50,
            window=50,
            min_samples=30,
            severity="warning",
            action="notify",
        ),
        *(
            AlertRule(
                name=f"{kind}-drift",
                metric=metric,
                op=">",
                threshold=0.0,
                window=25,
                min_samples=25,
                severity="warning",
                action="notify",
            )
            for kind, metric in (
                ("prediction", "drift.predictions"),
                ("input", "drift.inputs"),
                ("softmax", "drift.softmax"),
            )
        ),
    ]


class ChannelConfig(_Section):
    """Where an alert's transitions are sent.

    ``log`` writes a line to the monitor's log; ``webhook`` POSTs the alert as JSON;
    ``slack`` POSTs a Slack-compatible ``{"text": ...}`` message to an incoming-webhook
    URL; ``email`` sends a plain-text message over SMTP. Header values, a Slack URL and
    the password are secrets and must be ``${ENV}`` references (a webhook URL may be one),
    expanded only when sending and never printed; a login to a host other than loopback
    needs ``ssl`` or ``starttls``.
    """

    kind: Literal["log", "webhook", "slack", "email"]
    name: str | None = None
    min_severity: Severity = "info"
    url: str | None = None
    headers: dict[str, str] = {}
    timeout_s: float = Field(5.0, gt=0.0)
    host: str | None = None
    port: int = Field(25, ge=1, le=65535)
    starttls: bool = False
    ssl: bool = False
    username: str | None = None
    password: str | None = None
    sender: str | None = None
    to: list[str] = []

    @model_validator(mode="after")
    def _complete(self) -> ChannelConfig:
        if self.kind in ("webhook", "slack") and not self.url:
            raise ValueError(f"a {self.kind} channel needs a url")
        if self.kind == "email":
            missing = [k for k in ("host", "sender") if not getattr(self, k)]
            if missing or not self.to:
                raise ValueError(
                    "an email channel needs host, sender and to (a list of addresses); "
                    f"missing: {', '.join(missing + ([] if self.to else ['to']))}"
                )
        for header, value in self.headers.items():
            if not _is_reference(value):
                raise ValueError(
                    f"header {header!r}: write its value as an environment reference, e.g. "
                    "${WEBHOOK_TOKEN}: a literal would be stored with every run's config"
                )
        if self.kind == "slack" and self.url and not _is_reference(self.url):
            raise ValueError(
                "a Slack webhook URL is itself a secret: write it as an environment "
                "reference, e.g. ${SLACK_WEBHOOK_URL}"
            )
        if self.password is not None and not _is_reference(self.password):
            raise ValueError(
                "write the password as an environment reference, e.g. ${SMTP_PASSWORD}: "
                "a literal password would be stored with every run's config"
            )
        return self

    @property
    def label(self) -> str:
        return self.name or self.kind


class DriftConfig(_Section):
    """How drift is tested: against the reference distributions stored with the version.

    On every pass the newest ``persistence`` adjacent windows of a rule's ``window`` are
    tested; a column drifts when, in each of them, its test is significant after
    Benjamini-Hochberg correction across columns and segments (``alpha``) and its effect is
    above the floor (KS D, or PSI for the predicted classes), so large samples do not alarm
    on trivia and one odd window does not either.
    """

    # Two windows of 25: a shift shows within 50 predictions, and at alpha 0.001 a stable
    # stream flags a column in both about once in a million passes.
    alpha: float = Field(0.001, gt=0.0, lt=1.0)
    ks_min_effect: float = Field(0.1, ge=0.0, le=1.0, description="KS D floor")
    psi_min: float = Field(0.1, ge=0.0, description="PSI floor for predicted classes")
    persistence: int = Field(
        2, ge=1, description="adjacent windows (the newest) that must all drift to warn"
    )
    input_stats: list[str] = [
        "brightness",
        "contrast",
        "sharpness",
        "saturation",
        "dark_share",
    ]


class RetrainPolicy(_Section):
    """What the ``retrain`` action does, and what a new version must show to replace the
    incumbent."""

    min_new_labels: int = Field(
        50, ge=1, description="labelled captured images needed before retraining"
    )
    holdout_share: float = Field(
        0.3, gt=0.0, lt=1.0,
        description="share of the newest labelled production data kept out of training to "
        "gate the candidate against the incumbent",
    )  # fmt: skip
    holdout_min: int = Field(30, ge=1)
    max_regression: float = Field(
        0.0, ge=0.0, le=1.0,
        description="candidate accuracy on recent production data may trail the incumbent's "
        "by at most this",
    )  # fmt: skip
    replica_environment: str = Field("staging", description="where the replica test runs")
    strategy: Literal["canary", "direct"] = "canary"
    release_timeout_s: float = Field(
        900.0, gt=0.0, description="how long a canary may take to be promoted"
    )
    set: list[str] = Field(
        [], description="KEY=VALUE overrides for the retrain build, e.g. train.epochs=3"
    )
    cooldown_s: float = Field(
        600.0, ge=0.0, description="no new retrain of the same model within this after one"
    )
    labels_timeout_s: float = Field(
        3600.0, gt=0.0,
        description="a retrain still short of min_new_labels after this long gives up",
    )  # fmt: skip
    approval_timeout_s: float = Field(
        7 * 86400.0, gt=0.0, description="a loop waiting for a person gives up after this long"
    )
    holdout_max: int = Field(
        1000, ge=1, description="held-out recent production images at most (the newest)"
    )


class MonitorConfig(_Section):
    """The ``monitor:`` section."""

    environments: list[str] = ["production"]
    interval_s: float = Field(5.0, gt=0.0)
    segments: list[str] = ["camera_id"]
    owner: str | None = Field(None, description="who is told (named in every message)")
    rules: list[AlertRule] = Field(default_factory=default_rules)
    channels: list[ChannelConfig] = Field(default_factory=lambda: [ChannelConfig(kind="log")])
    drift: DriftConfig = DriftConfig()
    retrain: RetrainPolicy = RetrainPolicy()
    stale_labels_s: float = Field(
        3600.0, gt=0.0,
        description="no label for this long: accuracy rules are no-data, not firing",
    )  # fmt: skip
    late_s: float = Field(
        120.0, ge=0.0,
        description="predictions written up to this late are still seen by the next pass",
    )  # fmt: skip
    loop_stale_s: float = Field(
        60.0, gt=0.0,
        description="a loop whose monitor sent no heartbeat for this long is taken over by "
        "another (a monitor that died mid-loop)",
    )  # fmt: skip

    @field_validator("rules")
    @classmethod
    def _unique_names(cls, rules: list[AlertRule]) -> list[AlertRule]:
        seen: set[str] = set()
        for rule in rules:
            if rule.name in seen:
                raise ValueError(f"two rules are named {rule.name!r}; names must be unique")
            seen.add(rule.name)
        return rules

    def rule(self, name: str) -> AlertRule | None:
        return next((r for r in self.rules if r.name == name), None)


def to_dict(config: MonitorConfig) -> dict[str, Any]:
    return config.model_dump(mode="json")

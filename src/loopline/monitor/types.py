"""The nouns every monitor module shares: what a pass reads (``Outcome``, ``Logged``), what
a metric produces (``Measurement``), and the view of one deployed version a rule measures.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from loopline.drivers.metadata.store import MetadataStore
    from loopline.monitor.config import AlertRule
    from loopline.monitor.reference import Reference

GLOBAL = "global"


MAX_SCOPE_VALUE = 120  # characters of a segment value kept in a scope's name


def scope_name(column: str, value: str) -> str:
    """The scope of one segment value, as alerts and metrics name it: ``camera_id=cam-2``.

    Request metadata is the client's: a value longer than ``MAX_SCOPE_VALUE`` is cut and
    suffixed with a digest of the whole, so distinct values stay distinct and the name
    always fits the alert's scope column.
    """
    if len(value) > MAX_SCOPE_VALUE:
        digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:12]
        value = f"{value[: MAX_SCOPE_VALUE - 13]}~{digest}"
    return f"{column[:MAX_SCOPE_VALUE]}={value}"


def describe_window(count: int | None, seconds: float | None, unit: str = "") -> str:
    """How a measurement names its window: ``last 50 labelled``, ``last 600s``,
    ``last 50 labelled within 600s``; ``latest`` (or ``all <unit>``) without either."""
    noun = f" {unit}" if unit else ""
    if count is not None and seconds is not None:
        return f"last {count}{noun} within {seconds:g}s"
    if seconds is not None:
        return f"last {seconds:g}s"
    if count is not None:
        return f"last {count}{noun}"
    return f"all{noun}" if unit else "latest"


@dataclass(frozen=True)
class Outcome:
    """One labelled prediction: the log joined with its feedback.

    ``at`` is when the prediction was made, ``labelled_at`` when its (latest) label came;
    windows order by ``at``, so a label arriving late lands where its prediction was.
    """

    prediction_id: str
    at: datetime
    labelled_at: datetime
    model_version: int
    variant: str | None
    predicted: str
    actual: str
    confidence: float
    segments: dict[str, str] = field(default_factory=dict)

    @property
    def correct(self) -> bool:
        return self.predicted == self.actual


@dataclass(frozen=True)
class Logged:
    """One logged prediction, labelled or not: what label-free metrics and drift read."""

    prediction_id: str
    at: datetime
    model_version: int
    variant: str | None
    predicted: str
    confidence: float
    probabilities: list[float] | None = None
    input_stats: dict[str, Any] | None = None
    segments: dict[str, str] = field(default_factory=dict)


@dataclass
class Measurement:
    """A metric's value for one (environment, version, scope) over a window.

    ``value`` is None when the window holds fewer samples than the rule's minimum
    (no-data). ``evidence`` holds what a person needs to judge it (per-column p-values
    and effects for drift, the confusion counts for accuracy, ...), JSON-ready.
    """

    metric: str
    environment: str
    model_name: str
    model_version: int | None
    scope: str
    value: float | None
    samples: int
    window: str
    evidence: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        rule: AlertRule,
        view: VersionView,
        scope: str,
        value: float | None,
        samples: int,
        window: str,
        evidence: dict[str, Any] | None = None,
    ) -> Measurement:
        """A measurement of ``rule``'s metric for ``view``'s version."""
        return cls(rule.metric, view.environment, view.model_name, view.model_version,
                   scope, value, samples, window, evidence or {})  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "environment": self.environment,
            "model": self.model_name,
            "version": self.model_version,
            "scope": self.scope,
            "value": self.value,
            "samples": self.samples,
            "window": self.window,
            "evidence": self.evidence,
        }


class VersionView(Protocol):
    """What a rule may read about one version serving in one environment, at ``now``.

    ``labelled``/``logged`` return the newest samples of a scope (``GLOBAL`` or a
    ``scope_name``), oldest first, at most ``count`` and none older than ``seconds``
    before ``now`` (either may be None). ``new_outcomes`` are the labelled predictions
    that arrived since the previous pass, in label-arrival order (for sequential tests).
    """

    environment: str
    model_name: str
    model_version: int
    now: datetime
    store: MetadataStore
    reference: Reference | None

    def scopes(self, segment_by: list[str]) -> list[str]: ...

    def labelled(
        self, scope: str, count: int | None = None, seconds: float | None = None
    ) -> list[Outcome]: ...

    def logged(
        self, scope: str, count: int | None = None, seconds: float | None = None
    ) -> list[Logged]: ...

    def new_outcomes(self, scope: str) -> list[Outcome]: ...

    def new_logged(self, scope: str) -> list[Logged]: ...

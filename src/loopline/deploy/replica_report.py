"""The replica test's report: checks (a value against a limit), phases, and the whole.

A failed check gives one line of ``reasons``, e.g.
``accuracy 0.212 < 0.8 (rule accuracy >= 0.80)``; the report is passed only when every
phase passed or was skipped (nothing to replay, say). ``judge_replay`` makes the replay
phase's checks from what the candidate answered (``ReplayTally``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loopline.deploy.replica_inputs import ReplayItem
    from loopline.environments import ReplicaTestPolicy

PHASES = ("bulk", "replay", "load", "memory")
FAILED_OP = {">=": "<", ">": "<=", "<=": ">", "<": ">=", "==": "!="}


def fmt(value: float | None) -> str:
    """A number as reasons show it (3 significant digits)."""
    if value is None:
        return "n/a"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


@dataclass
class Check:
    """One number compared with its limit: ``value OP limit`` must hold."""

    name: str
    value: float | None
    op: str
    limit: float
    passed: bool
    source: str  # the rule or the policy setting the limit comes from
    unit: str = ""

    @property
    def reason(self) -> str:
        unit = f" {self.unit}" if self.unit else ""
        return (
            f"{self.name} {fmt(self.value)}{unit} {FAILED_OP[self.op]} "
            f"{fmt(self.limit)}{unit} ({self.source})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "reason": None if self.passed else self.reason}


def check(name: str, value: float | None, op: str, limit: float, source: str,
          unit: str = "") -> Check:  # fmt: skip
    from loopline.builder.gate import OPS

    passed = value is not None and bool(OPS[op](value, limit))
    return Check(name, value, op, limit, passed, source, unit)


@dataclass
class PhaseReport:
    """What one phase did: ``status`` passed, failed or skipped."""

    name: str
    status: str = "passed"
    seconds: float = 0.0
    checks: list[Check] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None  # why it was skipped

    def settle(self) -> PhaseReport:
        if self.status != "skipped":
            self.status = "passed" if all(c.passed for c in self.checks) else "failed"
        return self

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["checks"] = [c.to_dict() for c in self.checks]
        return out


@dataclass
class ReplicaTestReport:
    """The outcome of a replica test: passed only if every check of every phase passed."""

    model: str
    version: int
    environment: str
    endpoint: str
    started_at: datetime
    finished_at: datetime | None = None
    phases: list[PhaseReport] = field(default_factory=list)
    server: dict[str, Any] = field(default_factory=dict)  # how the replica ran
    notes: list[str] = field(default_factory=list)

    @property
    def checks(self) -> list[Check]:
        return [c for p in self.phases for c in p.checks]

    @property
    def passed(self) -> bool:
        return all(p.status in ("passed", "skipped") for p in self.phases)

    @property
    def reasons(self) -> list[str]:
        return [c.reason for c in self.checks if not c.passed]

    def phase(self, name: str) -> PhaseReport:
        for p in self.phases:
            if p.name == name:
                return p
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": f"{self.model}:{self.version}",
            "name": self.model,
            "version": self.version,
            "environment": self.environment,
            "endpoint": self.endpoint,
            "passed": self.passed,
            "reasons": self.reasons,
            "started_at": self.started_at.isoformat(),
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
            "phases": [p.to_dict() for p in self.phases],
            "server": self.server,
            "notes": self.notes,
        }


# -- replayed production requests ------------------------------------------------------------
@dataclass
class ReplayTally:
    """What the candidate answered for the replayed requests, against production and truth."""

    compared: int = 0
    agreed: int = 0
    labelled: int = 0  # requests with ground truth (feedback)
    candidate_right: int = 0
    production_right: int = 0
    unlabelled: int = 0
    unlabelled_agreed: int = 0

    def add(self, item: ReplayItem, answer: str) -> None:
        self.compared += 1
        self.agreed += answer == item.label
        if item.truth is None:
            self.unlabelled += 1
            self.unlabelled_agreed += answer == item.label
        else:
            self.labelled += 1
            self.candidate_right += answer == item.truth
            self.production_right += item.label == item.truth

    def accuracies(self) -> tuple[float | None, float | None]:
        """(candidate, production) accuracy on the labelled requests; None without any."""
        if not self.labelled:
            return None, None
        return self.candidate_right / self.labelled, self.production_right / self.labelled

    @property
    def agreement(self) -> float | None:
        """Agreement with production on the requests without ground truth."""
        return self.unlabelled_agreed / self.unlabelled if self.unlabelled else None


def judge_replay(phase: PhaseReport, t: ReplayTally, policy: ReplicaTestPolicy) -> None:
    """Add the replay phase's accuracy check (requests with ground truth) and agreement
    check (the others) to ``phase``, or say in its details why one is not made."""
    need, drop = policy.min_replay_requests, policy.max_accuracy_drop
    candidate, production = t.accuracies()
    accuracy_note = agreement_note = None
    production_worse = False  # shown by the labelled requests, beyond the tolerance
    if candidate is None or production is None:
        accuracy_note = "not checked: no replayed request has ground truth"
    elif t.labelled < need:
        accuracy_note = (
            f"not checked: {t.labelled} replayed requests with ground truth, fewer than "
            f"replica_test.min_replay_requests ({need})"
        )
    else:
        source = (
            f"production's accuracy {fmt(production)} on {t.labelled} labelled replayed "
            f"requests - replica_test.max_accuracy_drop {fmt(drop)}"
        )
        limit = max(0.0, production - drop)
        phase.checks.append(check("replay accuracy", candidate, ">=", limit, source))
        production_worse = candidate > production + drop
    if t.unlabelled == 0:
        agreement_note = (
            "not checked: every replayed request has ground truth (judged by accuracy)"
            if t.labelled
            else "not checked: no replayed request was answered"
        )
    elif t.unlabelled < need:
        agreement_note = (
            f"not checked: {t.unlabelled} replayed requests without ground truth, fewer "
            f"than replica_test.min_replay_requests ({need})"
        )
    elif production_worse:
        agreement_note = (
            f"not checked: on the {t.labelled} labelled replayed requests production is less "
            f"accurate than the candidate ({fmt(production)} against {fmt(candidate)}), so "
            "disagreeing with it is no defect"
        )
    else:
        phase.checks.append(
            check(
                "agreement with production",
                t.agreement,
                ">=",
                policy.min_agreement,
                "replica_test.min_agreement",
            )  # fmt: skip
        )
    phase.details.update(
        labelled=t.labelled, candidate_accuracy=candidate, production_accuracy=production,
        max_accuracy_drop=drop, accuracy_checked=accuracy_note is None,
        accuracy_note=accuracy_note, unlabelled=t.unlabelled,
        unlabelled_agreed=t.unlabelled_agreed, agreement=t.agreement,
        agreement_checked=agreement_note is None, agreement_note=agreement_note,
    )  # fmt: skip

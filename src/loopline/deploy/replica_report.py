"""The replica test's report: checks (a value against a limit), phases, and the whole.

A failed check gives one line of ``reasons``, e.g.
``accuracy 0.212 < 0.8 (rule accuracy >= 0.80)``; the report is passed only when every
phase passed or was skipped (nothing to replay, say).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

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

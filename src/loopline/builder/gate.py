"""Gate: acceptance rules from the config, and no regression against production.

Rules read ``METRIC OP NUMBER`` where METRIC is a dotted path into the evaluation report
(``macro_f1``, ``per_class.bus.recall``, ``segments.condition.fog.accuracy``).
"""

from __future__ import annotations

import json
import operator
import re
from collections.abc import Callable
from typing import Any

import pandas as pd

from loopline.builder.scoring import evaluate_bundle
from loopline.config import GateConfig
from loopline.errors import ConfigError
from loopline.pipeline import StepContext

OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    ">": operator.gt,
    "<=": operator.le,
    "<": operator.lt,
    "==": operator.eq,
}
RULE = re.compile(r"^\s*([A-Za-z_][\w.\-]*)\s*(>=|<=|==|>|<)\s*(-?\d+(?:\.\d+)?)\s*$")


class GateParams(GateConfig):
    """The gate section plus ``data.labels`` and ``model.name`` (whose alias it compares to)."""

    labels: list[str]
    name: str


HEADLINE = ("accuracy", "macro_precision", "macro_recall", "macro_f1", "n")
PER_CLASS = ("precision", "recall", "f1", "support")


def metric_known(path: str, labels: list[str], segments: list[str]) -> bool:
    """Whether ``path`` names a number of the evaluation report for these labels and segments.

    The report holds the headline numbers, ``per_class.<label>.<precision|recall|f1|support>``
    and, per value of each segment column, the same again under ``segments.<column>.<value>``.
    A segment's values are only known from the data, so any value is accepted here.
    """
    parts = path.split(".")
    if parts[0] == "segments":
        if len(parts) < 4 or parts[1] not in segments or not parts[2]:
            return False
        parts = parts[3:]
    if len(parts) == 1:
        return parts[0] in HEADLINE
    return (
        len(parts) == 3
        and parts[0] == "per_class"
        and parts[1] in labels
        and (parts[2] in PER_CLASS)
    )


def check_metrics(params: GateParams, segments: list[str]) -> None:
    """ConfigError naming the first rule (or ``gate.metric``) whose metric the report lacks."""
    named = [(f"gate rule {rule!r}", parse_rule(rule)[0]) for rule in params.rules]
    if params.compare_to:
        named.append(("gate.metric", params.metric))
    for where, metric in named:
        if not metric_known(metric, params.labels, segments):
            raise ConfigError(
                f"{where}: unknown metric {metric!r}; use {', '.join(HEADLINE)}, "
                f"per_class.<label>.<{'|'.join(PER_CLASS)}> (label in data.labels: "
                f"{', '.join(params.labels)}) or segments.<column>.<value>.<metric> "
                f"(column in evaluate.segments: {', '.join(segments) or 'none'})"
            )


def parse_rule(rule: str) -> tuple[str, str, float]:
    m = RULE.match(rule)
    if not m:
        raise ConfigError(
            f"gate rule {rule!r} is not 'METRIC OP NUMBER' (OP one of >=, >, <=, <, ==), "
            "e.g. 'macro_precision >= 0.80'"
        )
    return m.group(1), m.group(2), float(m.group(3))


def lookup(report: dict[str, Any], path: str) -> float:
    node: Any = report
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(
                f"gate metric {path!r} is not in the evaluation report; e.g. accuracy, "
                "macro_precision, macro_recall, macro_f1, per_class.<label>.recall, "
                "segments.<column>.<value>.accuracy"
            )
        node = node[part]
    return float(node)


def check_rules(report: dict[str, Any], rules: list[str]) -> list[dict[str, Any]]:
    checked = []
    for rule in rules:
        metric, op, threshold = parse_rule(rule)
        value = lookup(report, metric)
        checked.append({"rule": rule, "value": value, "passed": OPS[op](value, threshold)})
    return checked


def production_fingerprint(ctx: StepContext, params: GateParams) -> str:
    """Cache extra for the gate: the model it is compared against, resolved once per run.

    The gate reads the same model back from ``ctx.cache_extra`` (``baseline_model``), so an
    alias moved in between cannot make the decision come from another model than its key.
    """
    mv = ctx.resources.find_model(params.name, params.compare_to) if params.compare_to else None
    if mv is None:
        return ""
    return json.dumps(
        {"name": mv.name, "version": mv.version, "bundle_sha256": mv.bundle_sha256},
        sort_keys=True,
    )


def baseline_model(ctx: StepContext) -> dict[str, Any] | None:
    """The model ``production_fingerprint`` resolved for this run (name, version,
    bundle_sha256), or None when there is none to compare against."""
    return json.loads(ctx.cache_extra) if ctx.cache_extra else None


def gate(
    ctx: StepContext, metrics: dict[str, Any], splits: pd.DataFrame, params: GateParams
) -> dict[str, Any]:
    """Check the rules, and no regression against the model the cache key names."""
    rules = check_rules(metrics, params.rules)
    reasons = [f"{r['rule']} failed (value {r['value']:.4f})" for r in rules if not r["passed"]]
    baseline: dict[str, Any] | None = None
    mv = baseline_model(ctx) if params.compare_to else None
    if mv is not None:
        test = splits[splits["split"] == "test"].reset_index(drop=True)
        prod, _ = evaluate_bundle(ctx, mv["bundle_sha256"], test, params.labels)
        ours, theirs = lookup(metrics, params.metric), lookup(prod, params.metric)
        model = f"{mv['name']}:{mv['version']}"
        baseline = {
            "model": model,
            "alias": params.compare_to,
            "metric": params.metric,
            "candidate": ours,
            "baseline": theirs,
        }
        ctx.log(f"{params.metric}: candidate {ours:.4f} vs {params.compare_to} {theirs:.4f}")
        if ours < theirs - params.max_regression:
            reasons.append(
                f"{params.metric} {ours:.4f} is worse than {params.compare_to} "
                f"{model} ({theirs:.4f}) by more than {params.max_regression:g}"
            )
    accepted = not reasons
    ctx.log("accepted" if accepted else "rejected: " + "; ".join(reasons))
    return {"accepted": accepted, "reasons": reasons, "rules": rules, "baseline": baseline}


def halt_if_rejected(outputs: dict[str, Any]) -> str | None:
    decision = outputs["decision"]
    if decision["accepted"]:
        return None
    return "gate rejected the candidate: " + "; ".join(decision["reasons"])

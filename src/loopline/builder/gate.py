"""Gate: acceptance rules from the config, and no regression against production.

Rules read ``METRIC OP NUMBER`` where METRIC is a dotted path into the evaluation report
(``macro_f1``, ``per_class.bus.recall``, ``segments.condition.fog.accuracy``).
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from loopline.builder.images import label_indices, load_images
from loopline.config import GateConfig
from loopline.errors import ConfigError
from loopline.metrics import classification_report
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
    labels: list[str]


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


def production_fingerprint(ctx: StepContext) -> str:
    """Cache extra for the gate: which model it is compared against."""
    mv = ctx.resources.production_ref()
    return f"{mv.name}:{mv.version}:{mv.bundle_sha256}" if mv is not None else ""


def evaluate_bundle(
    ctx: StepContext,
    bundle_sha256: str,
    test: pd.DataFrame,
    labels: list[str],
    return_pred: bool = False,
) -> Any:
    """Evaluate a registered bundle with ONNX Runtime on ``test`` (same split as the candidate)."""
    import onnxruntime as ort

    from loopline.bundle import fetch_bundle, to_input

    res = ctx.resources
    bundle = fetch_bundle(res.artifacts, bundle_sha256, res.bundle_cache)
    if bundle.labels != labels:
        raise ConfigError(
            f"the production model's labels {bundle.labels} differ from data.labels {labels}"
        )
    size = bundle.preprocess.height
    x = load_images(ctx, test, size, "test images (production model)")
    opts = ort.SessionOptions()
    session = ort.InferenceSession(str(bundle.model_path), opts, providers=["CPUExecutionProvider"])
    preds = []
    for start in range(0, len(x), 256):
        (logits,) = session.run(["logits"], {"input": to_input(x[start : start + 256])})
        preds.append(logits.argmax(axis=1))
    pred = np.concatenate(preds) if preds else np.zeros(0, dtype=np.int64)
    report = classification_report(label_indices(test, labels), pred, labels)
    return (report, pred) if return_pred else report


def gate(
    ctx: StepContext, metrics: dict[str, Any], splits: pd.DataFrame, params: GateParams
) -> dict[str, Any]:
    rules = check_rules(metrics, params.rules)
    reasons = [f"{r['rule']} failed (value {r['value']:.4f})" for r in rules if not r["passed"]]
    baseline: dict[str, Any] | None = None
    mv = ctx.resources.production_ref()
    if mv is not None:
        test = splits[splits["split"] == "test"].reset_index(drop=True)
        prod = evaluate_bundle(ctx, mv.bundle_sha256, test, params.labels)
        ours, theirs = lookup(metrics, params.metric), lookup(prod, params.metric)
        baseline = {
            "model": f"{mv.name}:{mv.version}",
            "alias": params.compare_to,
            "metric": params.metric,
            "candidate": ours,
            "baseline": theirs,
        }
        ctx.log(f"{params.metric}: candidate {ours:.4f} vs {params.compare_to} {theirs:.4f}")
        if ours < theirs - params.max_regression:
            reasons.append(
                f"{params.metric} {ours:.4f} is worse than {params.compare_to} "
                f"{mv.name}:{mv.version} ({theirs:.4f}) by more than {params.max_regression:g}"
            )
    accepted = not reasons
    ctx.log("accepted" if accepted else "rejected: " + "; ".join(reasons))
    return {"accepted": accepted, "reasons": reasons, "rules": rules, "baseline": baseline}


def halt_if_rejected(outputs: dict[str, Any]) -> str | None:
    decision = outputs["decision"]
    if decision["accepted"]:
        return None
    return "gate rejected the candidate: " + "; ".join(decision["reasons"])

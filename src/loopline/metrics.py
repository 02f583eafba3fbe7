"""Classification metrics in plain numpy (no torch), the one place for them: Build's
evaluate and gate, ``loopline evaluate`` and the registry's summary use them, and Monitor
will score production feedback with the same functions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


def classification_report(
    y_true: np.ndarray, y_pred: np.ndarray, labels: list[str]
) -> dict[str, Any]:
    """Accuracy, per-class precision/recall/F1, macro averages and the confusion matrix.

    A class with no predictions has precision 0; one absent from ``y_true`` is left out of
    the macro averages (it has no recall to speak of).
    """
    k = len(labels)
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    tp = np.diag(cm).astype(float)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(k), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(k), where=denom > 0)
    present = support > 0
    n = int(support.sum())
    return {
        "n": n,
        "accuracy": float(tp.sum() / n) if n else 0.0,
        "macro_precision": float(precision[present].mean()) if present.any() else 0.0,
        "macro_recall": float(recall[present].mean()) if present.any() else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "per_class": {
            label: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, label in enumerate(labels)
        },
        "confusion_matrix": cm.tolist(),
    }


def headline(report: Mapping[str, Any]) -> dict[str, float]:
    """The four numbers people compare first."""
    return {k: report[k] for k in ("accuracy", "macro_precision", "macro_recall", "macro_f1")}

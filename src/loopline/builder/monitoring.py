"""What the package step stores for monitoring: ``monitoring.json`` in the bundle.

The Monitor compares production against it: the validation split's softmax outputs,
predicted-class shares and accuracy, a calibration of P(correct | confidence) for the
label-free accuracy estimate, and samples of the train and validation images' statistics
(``images.image_stats`` on the model-input-sized pixels, exactly what the server logs).

The file is plain JSON (calibration as isotonic breakpoints, never a pickle) and is the
same bytes for the same inputs, so the bundle stays deterministic. See
``loopline.monitor.reference`` for the reader.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from loopline.images import STAT_NAMES, image_stats
from loopline.monitor.reference import (
    FORMAT,
    MIN_CLASS_SAMPLES,
    SOFTMAX_DECIMALS,
    STATS_DECIMALS,
)

if TYPE_CHECKING:
    from loopline.pipeline import StepContext

MAX_SAMPLE = 2_000  # softmax rows and image-statistics values kept per column
MAX_VALIDATION = 10_000  # validation images scored for shares, accuracy and calibration
_SEED = 0  # samples are drawn with a fixed seed: same inputs, same bytes


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)  # type: ignore[no-any-return]


def sample_indices(n: int, size: int) -> np.ndarray:
    """At most ``size`` of ``range(n)``, sorted, drawn with a fixed seed."""
    if n <= size:
        return np.arange(n)
    return np.sort(np.random.default_rng(_SEED).choice(n, size, replace=False))


def _curve(confidence: np.ndarray, correct: np.ndarray) -> dict[str, Any]:
    """Isotonic P(correct | confidence) as breakpoints that ``np.interp`` evaluates.

    ``IsotonicRegression(out_of_bounds="clip").predict`` interpolates linearly between its
    thresholds and clips outside them, which is exactly ``np.interp`` over them.
    """
    from sklearn.isotonic import IsotonicRegression

    iso = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")
    iso.fit(confidence, correct.astype(np.float64))
    return {
        "x": [round(float(v), 6) for v in iso.X_thresholds_],
        "y": [round(float(v), 6) for v in iso.y_thresholds_],
        "n": int(len(confidence)),
    }


def calibration(
    probabilities: np.ndarray, val_labels: np.ndarray, labels: list[str]
) -> dict[str, Any]:
    """Global and per-predicted-class isotonic calibration of max-softmax confidence.

    A class gets its own curve when the validation split predicts it at least
    ``MIN_CLASS_SAMPLES`` times; the others use the global curve.
    """
    if len(probabilities) == 0:  # nothing to fit: the raw confidence stands
        return {
            "method": "isotonic",
            "min_class_samples": MIN_CLASS_SAMPLES,
            "global": {"x": [0.0, 1.0], "y": [0.0, 1.0], "n": 0},
            "classes": {},
        }
    predicted = probabilities.argmax(axis=1)
    confidence = probabilities.max(axis=1)
    correct = predicted == val_labels
    classes = {}
    for index, label in enumerate(labels):
        mask = predicted == index
        if int(mask.sum()) >= MIN_CLASS_SAMPLES:
            classes[label] = _curve(confidence[mask], correct[mask])
    return {
        "method": "isotonic",
        "min_class_samples": MIN_CLASS_SAMPLES,
        "global": _curve(confidence, correct),
        "classes": classes,
    }


def reference_payload(
    val_logits: np.ndarray,
    val_labels: np.ndarray,
    labels: list[str],
    train_val_stats: np.ndarray,
) -> dict[str, Any]:
    """The JSON-ready content of ``monitoring.json``.

    Args:
        val_logits: float [N, C] logits of the validation images.
        val_labels: int [N] true class indices of the same images.
        labels: the C class names, in output order.
        train_val_stats: float [M, len(STAT_NAMES)], ``image_stats`` of (a sample of)
            the train and validation images at the model's input size.
    """
    val_labels = np.asarray(val_labels, dtype=np.int64)
    if val_logits.shape != (len(val_labels), len(labels)):
        raise ValueError(
            f"validation logits {val_logits.shape} do not match {len(val_labels)} labels "
            f"of {len(labels)} classes"
        )
    if train_val_stats.ndim != 2 or train_val_stats.shape[1] != len(STAT_NAMES):
        raise ValueError(
            f"image statistics have shape {train_val_stats.shape}; expected "
            f"[M, {len(STAT_NAMES)}] columns {', '.join(STAT_NAMES)}"
        )
    n = len(val_labels)
    probs = softmax(val_logits) if n else np.zeros((0, len(labels)))
    predicted = probs.argmax(axis=1) if n else np.zeros(0, dtype=np.int64)
    counts = np.bincount(predicted, minlength=len(labels))
    shares = counts / n if n else np.full(len(labels), 1.0 / max(len(labels), 1))
    keep = sample_indices(n, MAX_SAMPLE)
    rows = sample_indices(len(train_val_stats), MAX_SAMPLE)
    stats = np.round(train_val_stats[rows].astype(np.float64), STATS_DECIMALS)
    return {
        "format": FORMAT,
        "labels": list(labels),
        "n": int(n),
        "accuracy": round(float((predicted == val_labels).mean()), 6) if n else 0.0,
        "class_shares": [round(float(s), 6) for s in shares],
        "softmax_decimals": SOFTMAX_DECIMALS,
        "softmax": np.round(probs[keep], SOFTMAX_DECIMALS).tolist(),
        "input_stats_decimals": STATS_DECIMALS,
        "input_stats": {name: stats[:, i].tolist() for i, name in enumerate(STAT_NAMES)},
        "input_stats_images": int(len(train_val_stats)),
        "calibration": calibration(probs, val_labels, labels),
    }


def encode(payload: dict[str, Any]) -> bytes:
    """``monitoring.json`` bytes: sorted keys, compact, so equal payloads are equal bytes."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()


def monitoring_file(
    ctx: StepContext,
    net: Any,
    splits: pd.DataFrame,
    input_size: int,
    labels: list[str],
) -> bytes:
    """Score the validation split with ``net`` and sample train+val image statistics.

    At most ``MAX_VALIDATION`` validation images are scored and ``MAX_SAMPLE`` images,
    train and validation in proportion, are decoded for statistics, so the step stays fast.
    """
    from loopline.builder import trainer
    from loopline.builder.images import label_indices, load_images

    val = splits[splits["split"] == "val"].reset_index(drop=True)
    val = val.iloc[sample_indices(len(val), MAX_VALIDATION)].reset_index(drop=True)
    train = splits[splits["split"] == "train"].reset_index(drop=True)
    x_val = load_images(ctx, val, input_size, "validation images (monitoring)")
    logits = trainer.predict_logits(net, x_val) if len(val) else np.zeros((0, len(labels)))
    total = len(train) + len(val)
    n_train = round(MAX_SAMPLE * len(train) / total) if total > MAX_SAMPLE else len(train)
    n_val = min(len(val), MAX_SAMPLE - n_train) if total > MAX_SAMPLE else len(val)
    picked = train.iloc[sample_indices(len(train), n_train)].reset_index(drop=True)
    x_train = load_images(ctx, picked, input_size, "training images (monitoring)")
    stats = np.concatenate(
        [
            image_stats(x_train, channels_last=True).reshape(-1, len(STAT_NAMES)),
            image_stats(x_val[sample_indices(len(val), n_val)], channels_last=True).reshape(
                -1, len(STAT_NAMES)
            ),
        ]
    )
    payload = reference_payload(logits, label_indices(val, labels), labels, stats)
    ctx.log(
        f"monitoring reference: {len(val)} validation images (accuracy "
        f"{payload['accuracy']:.3f}), statistics of {len(stats)} images"
    )
    return encode(payload)

"""A synthetic classifier and its prediction stream, for the reference, estimate and drift
tests: validation outputs and image statistics to build a real reference from, and logged
(and labelled) predictions fed through the real ``Windows``.

The "model" is a noisy score per class, sharpened so that its raw confidence overrates its
accuracy (as a CNN's does); the image statistics are plausible distributions of the eight
``image_stats`` columns. Nothing here is a mock of Loopline: it stands in for a model and
for cameras.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np

from loopline.builder.monitoring import encode, reference_payload, softmax
from loopline.monitor.reference import Reference
from loopline.monitor.stream import NewRows
from loopline.monitor.types import Logged, Outcome, VersionView
from loopline.monitor.windows import Windows

LABELS = ["car", "van", "truck", "bus", "bike"]
UNIFORM = [0.2] * 5
T0 = datetime(2025, 1, 1, tzinfo=UTC)


def outputs(
    rng: np.random.Generator,
    n: int,
    shares: list[float] = UNIFORM,
    strength: float = 2.0,
    sharpen: float = 3.0,
) -> tuple[np.ndarray, np.ndarray]:
    """(logits [n, 5], true labels [n]): the right class gets ``strength`` more signal."""
    y = rng.choice(len(LABELS), n, p=shares)
    scores = rng.normal(0.0, 1.0, (n, len(LABELS)))
    scores[np.arange(n), y] += strength
    return scores * sharpen, y


def stats(rng: np.random.Generator, n: int, brightness_shift: float = 0.0) -> np.ndarray:
    """[n, 8] image statistics in ``STAT_NAMES`` order."""
    brightness = rng.normal(120.0 + brightness_shift, 20.0, n)
    rgb = brightness[:, None] + rng.normal(0.0, 5.0, (n, 3))
    return np.column_stack(
        [
            brightness,
            rng.normal(50.0, 8.0, n),
            rgb,
            rng.lognormal(5.0, 0.4, n),
            rng.beta(2.0, 5.0, n),
            np.clip(rng.normal(0.05, 0.03, n), 0.0, 1.0),
        ]
    )


def make_reference(seed: int = 0, n_val: int = 3000) -> tuple[dict[str, Any], Reference]:
    """A payload as the package step builds it, and the Reference read back from its JSON."""
    rng = np.random.default_rng(seed)
    logits, y = outputs(rng, n_val)
    payload = reference_payload(logits, y, LABELS, stats(rng, 4000))
    return payload, Reference.from_payload(json.loads(encode(payload)))


class Stream:
    """Predictions logged one per second from ``T0``, labelled at once when asked."""

    def __init__(self, seed: int, max_count: int = 1000) -> None:
        self.rng = np.random.default_rng(seed)
        self.windows = Windows(max_count, 7 * 86400.0)
        self.count = 0

    @property
    def now(self) -> datetime:
        return T0 + timedelta(seconds=self.count)

    def rows(
        self,
        n: int,
        *,
        shares: list[float] = UNIFORM,
        strength: float = 2.0,
        brightness_shift: float = 0.0,
        camera: str | None = None,
        labelled: bool = False,
    ) -> tuple[list[Logged], list[Outcome]]:
        logits, y = outputs(self.rng, n, shares, strength)
        probs = softmax(logits)
        image = stats(self.rng, n, brightness_shift)
        logged, outcomes = [], []
        for i in range(n):
            self.count += 1
            at, pid = self.now, f"p{self.count:08d}"
            top = int(probs[i].argmax())
            segments = {"camera_id": camera} if camera else {}
            row = image[i].round(3).tolist()
            logged.append(
                Logged(
                    prediction_id=pid,
                    at=at,
                    model_version=1,
                    variant=None,
                    predicted=LABELS[top],
                    confidence=float(probs[i, top]),
                    probabilities=[round(float(p), 6) for p in probs[i]],
                    input_stats={
                        "brightness": row[0],
                        "contrast": row[1],
                        "mean_rgb": [round(v, 2) for v in row[2:5]],
                        "sharpness": row[5],
                        "saturation": row[6],
                        "dark_share": row[7],
                        "bytes": 1234,
                    },
                    segments=segments,
                )
            )
            if labelled:
                outcomes.append(
                    Outcome(
                        prediction_id=pid,
                        at=at,
                        labelled_at=at,
                        model_version=1,
                        variant=None,
                        predicted=LABELS[top],
                        actual=LABELS[int(y[i])],
                        confidence=float(probs[i, top]),
                        segments=segments,
                    )
                )
        return logged, outcomes

    def add(self, n: int, **kwargs: Any) -> tuple[list[Logged], list[Outcome]]:
        logged, outcomes = self.rows(n, **kwargs)
        self.windows.add(NewRows(outcomes=outcomes, logged=logged, cursor={}))
        return logged, outcomes

    def view(self, reference: Reference | None) -> VersionView:
        # The store is not read by the estimate or the drift tests.
        return self.windows.view("production", "vehicles", 1, self.now, None, reference)  # type: ignore[arg-type]

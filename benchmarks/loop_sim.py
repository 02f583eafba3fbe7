"""The detection simulation behind ``loop_bench.py``: a prediction stream through the real
monitor, from a stable start through a drift onset, counting what fires and when.

Nothing of the monitor is re-implemented here. Each seed gets a real SQLite
``MetadataStore``, a real deployment record for production, and a registered version
whose bundle holds a real ``monitoring.json`` (``builder.monitoring.reference_payload``);
predictions are logged with ``store.predictions.log`` in the rows the server writes
(probabilities, ``input_stats``), labels with ``store.predictions.record_feedback``, and
``monitor.service.run_pass`` runs every ``pass_every`` predictions with the default rules.

What stands in for production:

* the model is a noisy score per class, sharpened (a CNN's raw confidence overrates its
  accuracy): the true class gets ``strength`` more signal, chosen so that accuracy is
  ``p_before`` before the onset and ``p_after`` after it, when a bias towards one class
  also sets in (a model in the dark calls most things one class);
* the image statistics are those of real frames of the vehicle example
  (``examples.vehicles.datagen.render_image``, decoded to the model's input size and
  described with the server's own ``images.image_stats``): ``day`` frames before the
  onset and in the reference, ``fog`` and ``night`` frames (half each) after it.
"""

from __future__ import annotations

import json
import logging
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

LABELS = ["car", "van", "truck", "bus", "motorcycle"]
MODEL = "vehicles"
ENV = "production"
ACCURACY_RULE = "accuracy-low"
CUSUM_RULE = "accuracy-collapse"
UNLABELLED_RULES = ("estimated-accuracy-low", "prediction-drift", "input-drift", "softmax-drift")
REF_INDEX, PROD_INDEX = 0, 1_000_000  # render_image indices: reference and production apart
CAMERAS = 4
SPACING_S = 0.5  # seconds between two predictions
_CALIBRATION_DRAWS = 40_000


# -- the stand-in model ---------------------------------------------------------------------
@dataclass(frozen=True)
class Classifier:
    """Logits: N(0, 1) per class, the true class ``+strength``, class ``biased`` ``+bias``,
    all times ``sharpen``."""

    strength: float
    bias: float = 0.0
    biased: int = 0
    sharpen: float = 3.0

    def draw(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(logits [n, classes], true labels [n]), true labels uniform."""
        y = rng.integers(0, len(LABELS), n)
        scores = rng.normal(0.0, 1.0, (n, len(LABELS)))
        scores[np.arange(n), y] += self.strength
        scores[:, self.biased] += self.bias
        return scores * self.sharpen, y


def calibrated(accuracy: float, bias: float = 0.0, sharpen: float = 3.0) -> Classifier:
    """The classifier whose accuracy is ``accuracy`` (to ~0.3 points), by bisection on a
    fixed sample."""
    rng = np.random.default_rng(12345)
    y = rng.integers(0, len(LABELS), _CALIBRATION_DRAWS)
    noise = rng.normal(0.0, 1.0, (_CALIBRATION_DRAWS, len(LABELS)))
    rows = np.arange(_CALIBRATION_DRAWS)

    def acc(strength: float) -> float:
        scores = noise.copy()
        scores[rows, y] += strength
        scores[:, 0] += bias
        return float((scores.argmax(axis=1) == y).mean())

    lo, hi = -3.0, 8.0
    if not acc(lo) <= accuracy <= acc(hi):
        raise ValueError(
            f"accuracy {accuracy} is out of reach with bias {bias}: between "
            f"{acc(lo):.3f} and {acc(hi):.3f}"
        )
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if acc(mid) < accuracy else (lo, mid)
    return Classifier((lo + hi) / 2, bias, 0, sharpen)


# -- frames ---------------------------------------------------------------------------------
def frame_stats(
    condition: str | Iterable[str], n: int, start: int, input_size: int, seed: int = 0
) -> np.ndarray:
    """``image_stats`` [n, 8] of ``n`` rendered frames (labels and cameras in turn) at the
    model's input size, as the server computes them; ``condition`` may alternate."""
    from loopline.bundle import PreprocessSpec, decode_image, to_input
    from loopline.examples.vehicles.datagen import CLASSES, render_image
    from loopline.images import image_stats

    conds = [condition] if isinstance(condition, str) else list(condition)
    spec = PreprocessSpec(input_size, input_size)
    out = []
    for lo in range(0, n, 256):
        pixels = [
            decode_image(
                render_image(seed, start + i, i % CAMERAS, conds[i % len(conds)],
                             CLASSES[(i // CAMERAS) % len(CLASSES)]),
                spec,
            )
            for i in range(lo, min(n, lo + 256))
        ]  # fmt: skip
        out.append(image_stats(to_input(np.stack(pixels)), channels_last=False))
    return np.concatenate(out).astype(np.float64)


@dataclass
class Pools:
    """Frame statistics: the reference's (train+val, ``day``) and production's, apart."""

    reference: np.ndarray
    before: np.ndarray
    after: np.ndarray

    @classmethod
    def render(cls, n: int, input_size: int, after: tuple[str, ...] = ("fog", "night")) -> Pools:
        return cls(
            reference=frame_stats("day", n, REF_INDEX, input_size),
            before=frame_stats("day", n, PROD_INDEX, input_size),
            after=frame_stats(after, n, PROD_INDEX + n, input_size),
        )


def stats_row(s: np.ndarray, size: int) -> dict[str, Any]:
    """One ``input_stats`` row in the server's shape and rounding (``runtime._describe``)."""
    return {
        "brightness": round(float(s[0]), 3),
        "contrast": round(float(s[1]), 3),
        "mean_rgb": [round(float(v), 2) for v in s[2:5]],
        "sharpness": round(float(s[5]), 3),
        "saturation": round(float(s[6]), 3),
        "dark_share": round(float(s[7]), 3),
        "bytes": size,
    }


# -- the project --------------------------------------------------------------------------
@dataclass
class Scenario:
    """What one simulated stream looks like, and how often the monitor looks at it."""

    p_before: float = 0.90
    p_after: float = 0.30
    after_bias: float = 1.0  # logit bias towards one class after the onset
    onset: tuple[int, int] = (150, 250)  # predictions before the onset: uniform in [lo, hi]
    max_after: int = 400  # predictions after the onset at most
    pass_every: int = 5
    label_delay: int = 0  # labels arrive this many predictions after their prediction
    val_size: int = 2000  # validation predictions behind the reference
    pool: int = 1000  # frames per pool
    input_size: int = 64


@dataclass
class Simulation:
    """A reference bundle in an artifact store, and the models and frames behind it."""

    root: Path
    scenario: Scenario
    pools: Pools
    before: Classifier
    after: Classifier
    artifacts: Any
    bundle_uri: str
    bundle_sha256: str
    reference_accuracy: float
    config: Any

    @classmethod
    def create(cls, root: Path, scenario: Scenario, pools: Pools | None = None) -> Simulation:
        from loopline.builder.monitoring import encode, reference_payload
        from loopline.bundle import PreprocessSpec, write_bundle
        from loopline.config import Config
        from loopline.drivers.artifacts import ArtifactStore

        pools = pools or Pools.render(scenario.pool, scenario.input_size)
        before = calibrated(scenario.p_before)
        after = calibrated(scenario.p_after, scenario.after_bias)
        logits, y = before.draw(np.random.default_rng(7), scenario.val_size)
        payload = reference_payload(logits, y, LABELS, pools.reference)
        size = scenario.input_size
        files = {
            # never run: the monitor reads monitoring.json only, and fetch verifies bytes
            "model.onnx": b"not a model: the simulation stands in for it",
            "labels.json": json.dumps(LABELS).encode(),
            "preprocess.json": json.dumps(PreprocessSpec(size, size).to_dict()).encode(),
            "metadata.json": json.dumps({"name": MODEL}).encode(),
            "monitoring.json": encode(payload),
        }
        root.mkdir(parents=True, exist_ok=True)
        write_bundle(files, root / "bundle.tar")
        artifacts = ArtifactStore(str(root / "artifacts"))
        ref = artifacts.put_file(root / "bundle.tar")
        config = Config.model_validate(
            {"project": "loop-sim", "model": {"name": MODEL}, "monitor": {"environments": [ENV]}}
        )
        return cls(
            root, scenario, pools, before, after, artifacts, ref.uri, ref.sha256,
            float(payload["accuracy"]), config,
        )  # fmt: skip

    def store(self, name: str) -> Any:
        """A fresh SQLite store with the version registered and deployed to production."""
        from loopline.drivers.metadata.store import MetadataStore

        store = MetadataStore(f"sqlite:///{self.root / f'{name}.db'}")
        store.models.register(
            MODEL, bundle_uri=self.bundle_uri, bundle_sha256=self.bundle_sha256,
            metrics={"accuracy": self.reference_accuracy}, aliases=(),
        )  # fmt: skip
        store.deployments.change(
            ENV, expected_generation=0, action="promote", actor="loop-sim",
            model_name=MODEL, stable_version=1,
        )  # fmt: skip
        return store


# -- one stream -----------------------------------------------------------------------------
@dataclass
class Fired:
    rule: str
    pass_index: int
    logged_after: int  # predictions logged since the onset when it fired
    labelled_after: int  # of them, labelled
    value: float | None


@dataclass
class StreamResult:
    seed: int
    onset: int | None
    predictions: int
    passes: int
    seconds: float
    fired: list[Fired] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def first(self, rules: Iterable[str], *, after_onset: bool = True) -> Fired | None:
        names = set(rules)
        for f in self.fired:
            if f.rule in names and (f.logged_after > 0) == after_onset:
                return f
        return None

    @property
    def before_onset(self) -> list[Fired]:
        return [f for f in self.fired if f.logged_after <= 0]


class _Stream:
    """Logs and labels predictions the way the server and a labeller would."""

    def __init__(self, sim: Simulation, store: Any, rng: np.random.Generator, total: int) -> None:
        self.sim, self.store, self.rng = sim, store, rng
        # Stamped SPACING_S apart, all in the past: the cameras' pace, not the benchmark's
        # (the stream re-reads ``monitor.late_s`` of stamps on every pass).
        self.t0 = _now() - timedelta(seconds=total * SPACING_S + 60.0)
        self.count = 0
        self.unlabelled: list[tuple[int, str, str]] = []  # (index, id, actual), oldest first
        self.labelled = 0

    def log(self, n: int, model: Classifier, frames: np.ndarray) -> None:
        from loopline.builder.monitoring import softmax

        logits, y = model.draw(self.rng, n)
        probs = softmax(logits)
        pick = self.rng.integers(0, len(frames), n)
        # Ids as the server's (32 hex digits) but from the seed: the monitor reads labels that
        # arrive together in id order, so random ids would make a run irreproducible.
        ids = [self.rng.bytes(16).hex() for _ in range(n)]
        rows = []
        for i, pid in enumerate(ids):
            top = int(probs[i].argmax())
            camera = f"cam-{int(pick[i]) % CAMERAS + 1}"
            rows.append({
                "id": pid, "at": self.t0 + timedelta(seconds=self.count * SPACING_S),
                "model_name": MODEL, "model_version": 1, "source": "bytes",
                "label": LABELS[top], "confidence": float(probs[i, top]),
                "probabilities": np.round(probs[i], 6).tolist(),
                "request_metadata": {"camera_id": camera},
                "input_stats": stats_row(frames[pick[i]], 6000),
                "environment": ENV, "deployment_generation": 1, "variant": "stable",
                "camera_id": camera,
            })  # fmt: skip
            self.unlabelled.append((self.count, pid, LABELS[int(y[i])]))
            self.count += 1
        self.store.predictions.log(rows)

    def label(self, delay: int) -> None:
        """Label every prediction at least ``delay`` predictions old."""
        due = [u for u in self.unlabelled if u[0] < self.count - delay]
        if not due:
            return
        self.unlabelled = self.unlabelled[len(due) :]
        results = self.store.predictions.record_feedback([(pid, a) for _, pid, a in due])
        bad = [r for r in results if r["status"] not in ("recorded", "updated")]
        if bad:
            raise RuntimeError(f"feedback refused: {bad[:3]}")
        self.labelled = due[-1][0] + 1


def _now() -> Any:
    from loopline.drivers.metadata.models import utcnow

    return utcnow()


def _changes(report: Any) -> list[dict[str, Any]]:
    return [c for c in report.changes if c["kind"] in ("pending", "firing")]


def run_stream(
    sim: Simulation,
    seed: int,
    *,
    onset: int | None,
    total: int,
    pass_every: int,
    stop_when: Callable[[StreamResult], bool] | None = None,
) -> StreamResult:
    """``total`` predictions (``onset`` of them before the drift; None: no drift), a pass
    after every ``pass_every``; each alert's first pending or firing is recorded."""
    sc = sim.scenario
    rng = np.random.default_rng(seed)
    store = sim.store(f"seed-{seed}-{uuid.uuid4().hex[:6]}")
    stream = _Stream(sim, store, rng, total)
    result = StreamResult(seed, onset, 0, 0, 0.0)
    seen: set[str] = set()
    started = time.perf_counter()
    try:
        while stream.count < total:
            n = min(pass_every, total - stream.count)
            if onset is not None and stream.count < onset < stream.count + n:
                n = onset - stream.count  # the onset falls on a pass boundary's side
            drifted = onset is not None and stream.count >= onset
            stream.log(n, sim.after if drifted else sim.before,
                       sim.pools.after if drifted else sim.pools.before)  # fmt: skip
            stream.label(sc.label_delay)
            report = _pass(sim, store)
            result.passes += 1
            result.errors += report.errors
            logged_after = stream.count - onset if onset is not None else 0
            labelled_after = max(0, stream.labelled - onset) if onset is not None else 0
            for c in _changes(report):
                if c["rule"] in seen:
                    continue
                seen.add(c["rule"])
                result.fired.append(
                    Fired(c["rule"], result.passes, logged_after, labelled_after, c["value"])
                )
            if stop_when is not None and stop_when(result):
                break
    finally:
        result.predictions = stream.count
        result.seconds = time.perf_counter() - started
        store.close()
    return result


def _pass(sim: Simulation, store: Any) -> Any:
    from loopline.monitor import service

    return service.run_pass(sim.config, store, sim.artifacts, owner="loop-sim:1")


def _detected_all(result: StreamResult) -> bool:
    return all(
        result.first(rules) is not None
        for rules in ((ACCURACY_RULE,), (CUSUM_RULE,), UNLABELLED_RULES)
    )


def detection_run(sim: Simulation, seed: int) -> StreamResult:
    """One seed: a stable start of random length, then the drift, until the accuracy
    alert, the CUSUM warning and a label-free warning have all fired (or ``max_after``)."""
    sc = sim.scenario
    onset = int(np.random.default_rng([seed, 1]).integers(sc.onset[0], sc.onset[1] + 1))
    return run_stream(
        sim, seed, onset=onset, total=onset + sc.max_after, pass_every=sc.pass_every,
        stop_when=_detected_all,
    )  # fmt: skip


def stable_run(sim: Simulation, seed: int, predictions: int, pass_every: int) -> StreamResult:
    """``predictions`` of the stable stream, all labelled: every alert opened is false."""
    return run_stream(sim, seed, onset=None, total=predictions, pass_every=pass_every)


# -- figures --------------------------------------------------------------------------------
@dataclass
class Delays:
    """Delays over seeds (None: never fired within ``max_after``)."""

    values: list[int | None]

    @property
    def missed(self) -> int:
        return sum(v is None for v in self.values)

    def quantile(self, q: float) -> float:
        """Nearest-rank quantile; a miss counts as infinitely late."""
        vals = sorted(float("inf") if v is None else float(v) for v in self.values)
        if not vals:
            return float("nan")
        return vals[min(len(vals) - 1, max(0, int(np.ceil(q * len(vals))) - 1))]

    @property
    def median(self) -> float:
        vals = [float("inf") if v is None else float(v) for v in self.values]
        return float(statistics.median(vals)) if vals else float("nan")


def delays(results: list[StreamResult]) -> dict[str, Delays]:
    """The three figures: labelled predictions to the accuracy alert and to the CUSUM
    warning, unlabelled predictions to the first label-free warning."""

    def of(rules: tuple[str, ...], attr: str) -> Delays:
        out: list[int | None] = []
        for r in results:
            f = r.first(rules)
            out.append(None if f is None else int(getattr(f, attr)))
        return Delays(out)

    return {
        "accuracy_alert": of((ACCURACY_RULE,), "labelled_after"),
        "cusum_warning": of((CUSUM_RULE,), "labelled_after"),
        "label_free_warning": of(UNLABELLED_RULES, "logged_after"),
        **{f"rule:{name}": of((name,), "logged_after") for name in UNLABELLED_RULES},
    }


def quiet() -> None:
    """The log channel's lines and per-pass chatter off: the benchmark prints figures."""
    logging.getLogger("loopline").setLevel(logging.CRITICAL + 1)


def temp_root() -> Path:
    return Path(tempfile.mkdtemp(prefix="loopline-loop-sim-"))

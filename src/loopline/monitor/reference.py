"""The reference a version's build stored for monitoring, read back from its bundle.

The package step writes ``monitoring.json`` into the bundle (``builder.monitoring``):
the validation split's accuracy, predicted-class shares, a softmax sample, calibration
curves of P(correct | confidence), and samples of the train and validation images'
statistics. ``load_reference`` reads it from the registered bundle, verified against the
registry's sha256 and the bundle's manifest; a model imported without one (or built
before it existed) has no reference, and label-free rules report no-data for it.
"""

from __future__ import annotations

import json
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from loopline.errors import IntegrityError

FORMAT = "loopline-monitoring/1"
FILENAME = "monitoring.json"
MIN_CLASS_SAMPLES = 30  # validation predictions of a class needed for its own curve
SOFTMAX_DECIMALS = 4
STATS_DECIMALS = 3  # as the server rounds the statistics it logs
CACHE_SIZE = 16


@dataclass(frozen=True)
class Curve:
    """A monotone calibration curve: linear between breakpoints, flat outside them."""

    x: tuple[float, ...]
    y: tuple[float, ...]
    n: int = 0

    def __call__(self, confidence: np.ndarray) -> np.ndarray:
        return np.interp(confidence, self.x, self.y)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Curve:
        x, y = tuple(float(v) for v in data["x"]), tuple(float(v) for v in data["y"])
        if not x or len(x) != len(y):
            raise ValueError("a calibration curve needs as many x as y breakpoints, at least one")
        return cls(x, y, int(data.get("n", 0)))


@dataclass(frozen=True)
class Calibration:
    """P(correct | max-softmax confidence): one curve per predicted class that had
    enough validation samples, the global curve for the others."""

    global_curve: Curve
    classes: dict[str, Curve] = field(default_factory=dict)

    def p_correct(
        self, predicted: Sequence[str], confidence: Sequence[float] | np.ndarray
    ) -> np.ndarray:
        """Calibrated probability that each prediction is right."""
        conf = np.asarray(confidence, dtype=np.float64)
        out = self.global_curve(conf)
        if self.classes and len(conf):
            labels = np.asarray(predicted, dtype=object)
            for label, curve in self.classes.items():
                mask = labels == label
                if mask.any():
                    out[mask] = curve(conf[mask])
        return out  # type: ignore[no-any-return]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        return cls(
            Curve.from_dict(data["global"]),
            {label: Curve.from_dict(c) for label, c in data.get("classes", {}).items()},
        )


@dataclass
class Reference:
    """What a version's build measured on its own data, for production to be compared with."""

    labels: list[str]
    accuracy: float  # on the validation split
    n: int  # validation images scored
    class_shares: list[float]  # predicted-class shares on the validation split
    softmax: list[list[float]]  # a sample of validation softmax rows
    input_stats: dict[str, list[float]]  # a sample per image statistic (train + validation)
    calibration: Calibration
    softmax_decimals: int = SOFTMAX_DECIMALS
    stats_decimals: int = STATS_DECIMALS
    bundle_sha256: str | None = None

    @cached_property
    def softmax_array(self) -> np.ndarray:
        """The softmax sample as float [rows, classes]."""
        return np.asarray(self.softmax, dtype=np.float64).reshape(-1, len(self.labels))

    @classmethod
    def from_payload(cls, data: dict[str, Any], bundle_sha256: str | None = None) -> Reference:
        """Parse ``monitoring.json``; IntegrityError when it is not one this Loopline reads."""
        fmt = data.get("format") if isinstance(data, dict) else None
        if fmt != FORMAT:
            raise IntegrityError(f"{FILENAME} has format {fmt!r}; this Loopline reads {FORMAT}")
        try:
            labels = [str(v) for v in data["labels"]]
            ref = cls(
                labels=labels,
                accuracy=float(data["accuracy"]),
                n=int(data["n"]),
                class_shares=[float(v) for v in data["class_shares"]],
                softmax=[[float(v) for v in row] for row in data["softmax"]],
                input_stats={k: [float(v) for v in vs] for k, vs in data["input_stats"].items()},
                calibration=Calibration.from_dict(data["calibration"]),
                softmax_decimals=int(data.get("softmax_decimals", SOFTMAX_DECIMALS)),
                stats_decimals=int(data.get("input_stats_decimals", STATS_DECIMALS)),
                bundle_sha256=bundle_sha256,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise IntegrityError(f"{FILENAME} is unreadable: {err!r}") from None
        if len(ref.class_shares) != len(labels) or any(len(r) != len(labels) for r in ref.softmax):
            raise IntegrityError(f"{FILENAME} is unreadable: its columns do not match its labels")
        return ref


_cache: OrderedDict[str, Reference | None] = OrderedDict()
_lock = threading.Lock()


def clear_cache() -> None:
    with _lock:
        _cache.clear()


def load_reference(store: Any, artifacts: Any, name: str, version: int) -> Reference | None:
    """The reference stored with model ``name:version``; None when its bundle has none.

    The bundle is fetched from the artifact store, checked against the registry's sha256
    and verified against its manifest; only ``monitoring.json``, when the manifest lists
    it, is read. Results (None included) are cached per bundle sha256.
    """
    from loopline.bundle import MANIFEST, fetch_bundle

    digest = store.models.get(name, version).bundle_sha256
    with _lock:
        if digest in _cache:
            _cache.move_to_end(digest)
            return _cache[digest]
    with tempfile.TemporaryDirectory(prefix="loopline-reference-") as tmp:
        bundle = fetch_bundle(artifacts, digest, Path(tmp))
        listed = json.loads((bundle.path / MANIFEST).read_bytes())["files"]
        if FILENAME in listed:
            payload = json.loads((bundle.path / FILENAME).read_bytes())
            reference: Reference | None = Reference.from_payload(payload, digest)
        else:
            reference = None
    with _lock:
        _cache[digest] = reference
        _cache.move_to_end(digest)
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return reference

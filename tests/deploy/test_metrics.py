"""Server metrics: batch observations written in bulk count as one by one would."""

from __future__ import annotations

import numpy as np
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from loopline.deploy.metrics import CONFIDENCE_BUCKETS, observe_many


def test_observe_many_counts_as_observe_does() -> None:
    values = np.array([0.1, 0.2, 0.2000001, 0.5, 0.95, 0.99, 1.0, 0.3, 0.999, 1.5, np.nan],
                      dtype=np.float32)  # fmt: skip
    one, bulk = CollectorRegistry(), CollectorRegistry()
    a = Histogram("conf", "c", buckets=CONFIDENCE_BUCKETS, registry=one)
    b = Histogram("conf", "c", buckets=CONFIDENCE_BUCKETS, registry=bulk)
    for v in values.tolist():
        a.observe(v)
    observe_many(b, values)
    observe_many(b, values[:1])  # one value: the plain path
    a.observe(float(values[0]))

    def samples(registry: CollectorRegistry) -> list[str]:
        text = generate_latest(registry).decode().splitlines()
        return [line for line in text if line.startswith("conf_") and "created" not in line]

    assert samples(one) == samples(bulk)
    assert "conf_count 11.0" in samples(bulk)  # 12 values, the NaN in no bucket

"""Synthetic demo runs for the figure and report tests: frames with known answers."""

from __future__ import annotations

from loopline.demo.timeline import Event
from loopline.demo.traffic import Sample


def frames(
    start: float,
    count: int,
    *,
    every: float,
    version: int,
    right_every: int,
    condition: str = "day",
    delay: float = 2.0,
    first_id: int = 0,
) -> list[Sample]:
    """``count`` frames from ``start``, each labelled ``delay`` later; one in
    ``right_every`` is answered right (1: all of them, 0: none)."""
    out = []
    for i in range(count):
        t = start + i * every
        right = right_every > 0 and i % right_every == 0
        out.append(
            Sample(
                prediction_id=f"p{first_id + i}",
                t=t,
                camera=f"cam0{i % 4 + 1}",
                condition=condition,
                truth="car",
                predicted="car" if right else "bus",
                confidence=0.9,
                version=version,
                latency_ms=5.0,
                labelled_t=t + delay,
            )
        )
    return out


def story() -> tuple[list[Sample], list[Event], float]:
    """100 s of traffic at 10 frames/s: v1 all right on day until 30 s, then right one in
    four on fog; the alert at 36 s; v2 all right from 70 s. Returns samples, events, onset."""
    day = frames(0.0, 300, every=0.1, version=1, right_every=1)
    fog = frames(30.0, 400, every=0.1, version=1, right_every=4, condition="fog", first_id=300)
    v2 = frames(70.0, 300, every=0.1, version=2, right_every=1, condition="fog", first_id=700)
    events = [
        Event(30.0, "drift", "drift onset"),
        Event(
            32.5,
            "warning",
            "input-drift firing",
            {"rule": "input-drift", "metric": "drift.inputs", "alert_id": 1, "version": 1},
        ),
        Event(
            36.0,
            "alert",
            "accuracy-low firing",
            {"rule": "accuracy-low", "metric": "accuracy", "alert_id": 2, "version": 1},
        ),
        Event(60.0, "canary", "canary: v2 takes 10%", {"stable": 1, "candidate": 2}),
        Event(70.0, "redeploy", "v2 answers all production traffic"),
    ]
    return day + fog + v2, events, 30.0

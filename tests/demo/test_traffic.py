"""The simulated cameras and labeller against a real prediction server (a tiny CNN)."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from loopline.demo.scenario import Schedule
from loopline.demo.timeline import Clock
from loopline.demo.traffic import Traffic
from tests.deploy.conftest import TOKEN, make_project, model_bytes, serving

__all__ = ["model_bytes"]


def test_cameras_post_frames_and_the_labeller_posts_the_truth_later(
    tmp_path: Path, model_bytes: bytes
) -> None:
    project = make_project(tmp_path / "p", model_bytes)
    clock = Clock()
    with serving(project, flush_interval_s=0.1) as server:
        traffic = Traffic(
            server.url,
            "vehicles",
            TOKEN,
            Schedule.drift(0.6),
            clock,
            seed=3,
            cameras=3,
            rate=30.0,
            label_delay_s=0.3,
            window=20,
        )
        traffic.start()
        deadline = time.monotonic() + 120
        while sum(1 for s in traffic.log.copy() if s.condition != "day") < 15:
            assert time.monotonic() < deadline, traffic.log.stats()
            time.sleep(0.05)
        traffic.stop()
        samples = traffic.log.copy()
        store = project.store()
        try:
            labels = store.predictions.feedback([s.prediction_id for s in samples])
            rows = {p.id: p for p in store.predictions.find(model_name="vehicles", limit=10_000)}
        finally:
            store.close()
    stats = traffic.log.stats()
    assert stats.errors == 0, stats.last_error
    assert stats.requests == len(samples) and stats.labelled == len(samples)
    onset = traffic.onset_t
    assert onset is not None
    for s in samples:  # a frame's condition is the schedule's when it was taken
        assert (s.condition == "day") == (s.t < onset), (s.t, onset, s.condition)
        assert s.labelled_t is not None and s.labelled_t >= s.t + 0.3
        assert labels[s.prediction_id] == s.truth  # the truth, not the answer
        assert rows[s.prediction_id].camera_id == s.camera
        assert rows[s.prediction_id].label == s.predicted and s.version == 1
    assert {s.condition for s in samples if s.t >= onset} == {"fog", "night"}
    assert set(Counter(s.camera for s in samples)) == {"cam01", "cam02", "cam03"}

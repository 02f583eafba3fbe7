"""The demo's scenario and schedule: what each camera sees when, and the config it writes."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

from loopline.config import parse_config
from loopline.demo.project import TOKEN_VAR, config_text
from loopline.demo.scenario import DAY, Phase, Scenario, Schedule
from loopline.errors import ConfigError


def draws(schedule: Schedule, t: float, n: int, seed: int = 0) -> Counter[str]:
    rng = np.random.default_rng(seed)
    return Counter(schedule.condition_at(t, rng) for _ in range(n))


def test_day_until_the_onset_then_fog_and_mostly_night() -> None:
    schedule = Schedule.drift(10.0)
    assert schedule.onset_s == 10.0
    assert draws(schedule, 0.0, 500) == Counter({"day": 500})
    assert draws(schedule, 9.999, 500) == Counter({"day": 500})
    after = draws(schedule, 10.0, 2000)
    assert set(after) == {"fog", "night"}
    # 2000 draws at a fog share of 0.25: 500 +- 5 standard deviations (19.4 each).
    assert abs(after["fog"] - 500) < 97
    assert schedule.phase_at(3.0).name == "day" and schedule.phase_at(30.0).name == "drift"


def test_weights_are_honoured_and_draws_repeat_with_the_seed() -> None:
    schedule = Schedule.drift(1.0, {"night": 3.0, "fog": 1.0})
    after = draws(schedule, 5.0, 4000)
    assert abs(after["night"] / 4000 - 0.75) < 0.04
    assert draws(schedule, 5.0, 300, seed=7) == draws(schedule, 5.0, 300, seed=7)


def test_a_schedule_without_drift_never_leaves_day() -> None:
    schedule = Schedule((Phase(0.0, DAY, "day"),))
    assert schedule.onset_s is None
    assert draws(schedule, 1e6, 100) == Counter({"day": 100})


@pytest.mark.parametrize(
    ("phases", "message"),
    [
        ((), "the first one starting at 0 s"),
        ((Phase(1.0, DAY),), "the first one starting at 0 s"),
        ((Phase(0.0, DAY), Phase(5.0, DAY), Phase(5.0, DAY)), "increasing order"),
        ((Phase(0.0, {"snow": 1.0}),), "must be non-negative weights of day, night, fog, rain"),
        ((Phase(0.0, {"day": 0.0}),), "weights sum to 0"),
    ],
)
def test_bad_schedules_are_refused(phases: tuple[Phase, ...], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Schedule(phases)


def test_the_retrain_waits_for_enough_drifted_labels() -> None:
    s = Scenario()
    day = s.rate * s.day_s
    n = s.retrain_min_labels
    # With the day captures and the newest holdout share taken out, the drifted ones left
    # to train on are at least retrain_new_labels.
    assert n * (1 - s.holdout_share) - day >= s.retrain_new_labels
    assert n * (1 - s.holdout_share) - day < s.retrain_new_labels + 2
    assert n == math.ceil((s.retrain_new_labels + day) / (1 - s.holdout_share))


@pytest.mark.parametrize(
    "changes",
    [{"rate": 0.0}, {"cameras": 0}, {"lake_images": 50}, {"day_s": 0.0}, {"holdout_share": 1.0}],
)
def test_bad_scenarios_are_refused(changes: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        Scenario().with_(**changes)


@pytest.mark.parametrize("scenario", [Scenario(), Scenario.fast()])
def test_the_demo_config_is_a_valid_project_config(scenario: Scenario, tmp_path: Path) -> None:
    cfg = parse_config(yaml.safe_load(config_text(scenario, 45678)), tmp_path)
    prod = cfg.environment("production")
    assert prod.port == 45678 and prod.token == f"${{{TOKEN_VAR}}}"
    assert prod.capture.enabled and prod.capture.sample_rate == 1.0
    assert prod.canary.min_requests == scenario.canary_min_requests
    assert prod.canary.min_labels == scenario.canary_min_labels
    assert cfg.environment("staging").replica_of == "production"
    assert cfg.monitor.retrain.min_new_labels == scenario.retrain_min_labels
    assert cfg.monitor.retrain.set == [f"train.epochs={scenario.retrain_epochs}"]
    assert cfg.monitor.interval_s == scenario.monitor_interval_s
    assert [r.name for r in cfg.monitor.rules][0] == "accuracy-low"  # the default rules
    assert (cfg.train.input_size, cfg.train.epochs, cfg.train.threads) == (
        scenario.input_size,
        scenario.epochs,
        1,
    )
    assert cfg.data.source.uri == "./lake" and cfg.data.filter == {}

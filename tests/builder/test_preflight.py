"""Preflight: config mistakes that would only show after training fail before any step runs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from loopline.builder import build
from loopline.builder.gate import GateParams, check_metrics, metric_known
from loopline.builder.pipeline import open_stores
from loopline.config import parse_config
from loopline.errors import ConfigError

LABELS = ["car", "van", "truck", "bus", "motorcycle"]


def _config(tmp_path: Path, lake: Path, **sections: dict) -> object:
    data = {
        "data": {"source": {"uri": str(lake)}},
        "store": {"metadata_url": f"sqlite:///{tmp_path / 'm.db'}"},
        **sections,
    }
    return parse_config(data, tmp_path)


def _fails_before_ingest(config: object, match: str) -> str:
    with pytest.raises(ConfigError, match=match) as info:
        build(config)  # type: ignore[arg-type]
    store, _ = open_stores(config)  # type: ignore[arg-type]
    assert store.runs.recent() == []  # no run started, so no step ran
    store.close()
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "usernets.py").write_text(
        "import torch\n\n\nclass Plain:\n    pass\n\n\nclass Net(torch.nn.Module):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "usernets"
    sys.modules.pop("usernets", None)


def test_an_architecture_that_is_not_a_module_is_refused(
    tmp_path: Path, tiny_lake: Path, user_module: str
) -> None:
    config = _config(tmp_path, tiny_lake, train={"architecture": f"{user_module}:Plain"})
    message = _fails_before_ingest(config, "is not a torch.nn.Module class")
    assert "usernets:Plain" in message
    config = _config(tmp_path, tiny_lake, train={"architecture": f"{user_module}:Missing"})
    _fails_before_ingest(config, "'Missing' is not a torch.nn.Module class")
    config = _config(tmp_path, tiny_lake, train={"architecture": "no_such_module_x:Net"})
    _fails_before_ingest(config, "unknown architecture 'no_such_module_x:Net'")


def test_a_gate_rule_naming_an_unknown_metric_is_refused(tmp_path: Path, tiny_lake: Path) -> None:
    for rule, what in [
        ("macro_f2 >= 0.5", "macro_f2"),
        ("per_class.tractor.recall >= 0.5", "per_class.tractor.recall"),
        ("per_class.bus.accuracy >= 0.5", "per_class.bus.accuracy"),
        ("segments.weather.fog.accuracy >= 0.5", "segments.weather.fog.accuracy"),
    ]:
        config = _config(tmp_path, tiny_lake, gate={"rules": [rule]})
        message = _fails_before_ingest(config, f"unknown metric '{what}'")
        assert message.startswith(f"gate rule '{rule}'")
        assert "bus" in message and "condition" in message  # names what is allowed
    config = _config(tmp_path, tiny_lake, gate={"metric": "f1"})
    _fails_before_ingest(config, "gate.metric: unknown metric 'f1'")


def test_known_metric_paths() -> None:
    segments = ["condition", "camera_id"]
    for path in [
        "accuracy",
        "macro_precision",
        "macro_recall",
        "macro_f1",
        "per_class.bus.recall",
        "per_class.car.support",
        "segments.condition.fog.accuracy",
        "segments.camera_id.cam01.per_class.van.f1",
    ]:
        assert metric_known(path, LABELS, segments), path
    for path in [
        "",
        "per_class.bus",
        "per_class.bus.recall.x",
        "segments.condition.accuracy",
        "segments.condition..accuracy",
        "confusion_matrix",
    ]:
        assert not metric_known(path, LABELS, segments), path
    params = GateParams(rules=["accuracy > 0.5"], labels=LABELS, name="m", compare_to=None)
    check_metrics(params.model_copy(update={"metric": "nonsense"}), segments)  # no compare

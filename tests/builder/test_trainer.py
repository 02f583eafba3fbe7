"""Tests for the torch trainer: models by name or import path, search, determinism, ONNX.

Real torch, Optuna and ONNX Runtime on tiny synthetic images (bright squares, vertical and
horizontal bars on noise), so the whole file runs in seconds on a CPU.
"""

from __future__ import annotations

import importlib
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import IN_CI


def _train_extra(name: str) -> Any:
    """A module of the ``train`` extra: without it the file is skipped, but fails in CI."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        if IN_CI:
            pytest.fail(f"the train extra is required in CI but {name} is missing: {err}")
        pytest.skip(
            f"the train extra is not installed ({name}): pip install 'loopline[train]'",
            allow_module_level=True,
        )


torch = _train_extra("torch")
_train_extra("optuna")
ort = _train_extra("onnxruntime")

from loopline.builder import trainer  # noqa: E402
from loopline.builder.trainer import ModelSpec  # noqa: E402
from loopline.config import TrainConfig  # noqa: E402
from loopline.errors import ConfigError, PipelineError  # noqa: E402

SIZE = 32
CLASSES = 3
Data = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
Outcome = tuple[trainer.TrainOutcome, list[trainer.TrialResult], list[tuple[int, int]]]


def make_shapes(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [n, 32, 32, 3] noise with a bright square, vertical bar or horizontal bar."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % CLASSES
    x = rng.integers(0, 80, (n, SIZE, SIZE, 3), dtype=np.uint8)
    for i, label in enumerate(y):
        r, c = rng.integers(4, 12, 2)
        if label == 0:
            x[i, r : r + 14, c : c + 14] = 230
        elif label == 1:
            x[i, 2:30, c + 5 : c + 9] = 230
        else:
            x[i, r + 5 : r + 9, 2:30] = 230
    return x, y.astype(np.int64)


@pytest.fixture(scope="module")
def data() -> Data:
    train_x, train_y = make_shapes(90, seed=1)
    val_x, val_y = make_shapes(30, seed=2)
    return train_x, train_y, val_x, val_y


def config(**search: object) -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "input_size": SIZE, "depth": 2, "width": 8, "batch_size": 16, "epochs": 2,
            "threads": 1, "search": {"pruner": "none", **search},
        }
    )  # fmt: skip


def run_search(data: Data, params: TrainConfig, **kwargs: Any) -> trainer.TrainOutcome:
    return trainer.search(*data, params, CLASSES, **kwargs)


@pytest.fixture(scope="module")
def outcome(data: Data) -> Outcome:
    trials: list[trainer.TrialResult] = []
    epochs: list[tuple[int, int]] = []
    result = run_search(
        data,
        config(space={"lr": [0.01, 0.003]}),
        on_trial=trials.append,
        on_epoch=lambda t, e, stats: epochs.append((t, e)),
    )
    return result, trials, epochs


TINY_MODULE = """
    import torch
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self, num_classes, input_size):
            super().__init__()
            self.input_size = input_size
            self.head = nn.Linear(3, num_classes)

        def forward(self, x):
            return self.head(x.mean(dim=(2, 3)) / 255.0)

    class FailsInTraining(Tiny):
        def forward(self, x):
            if self.training:
                raise RuntimeError("boom")
            return super().forward(x)
"""


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A user's architecture module on sys.path, as a project would have it."""
    (tmp_path / "user_arch.py").write_text(textwrap.dedent(TINY_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "user_arch"


def test_build_cnn_gives_logits_per_class() -> None:
    model = trainer.build_model(ModelSpec("cnn", CLASSES, SIZE, depth=2, width=8))
    out = model(torch.rand(4, 3, SIZE, SIZE) * 255)
    assert out.shape == (4, CLASSES)


def test_build_user_module_by_import_path(user_module: str) -> None:
    spec = ModelSpec(f"{user_module}:Tiny", CLASSES, SIZE, depth=5, width=3)
    model = trainer.build_model(spec)  # depth/width are not passed: Tiny does not take them
    assert type(model).__name__ == "Tiny" and model.input_size == SIZE
    assert model(torch.zeros(2, 3, SIZE, SIZE)).shape == (2, CLASSES)


@pytest.mark.parametrize(
    ("architecture", "message"),
    [
        ("resnet", "unknown architecture 'resnet': use 'cnn' or 'package.module:ClassName'"),
        ("no_such_module_xyz:Net", "cannot import 'no_such_module_xyz'"),
        ("json:loads", "is not a torch.nn.Module class"),
    ],
)
def test_bad_architecture_is_a_config_error(architecture: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        trainer.build_model(ModelSpec(architecture, CLASSES, SIZE))


def test_model_spec_round_trips() -> None:
    spec = ModelSpec("cnn", 5, 64, depth=2, width=16, dropout=0.2)
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ConfigError, match="num_classes"):
        ModelSpec.from_dict({"architecture": "cnn", "input_size": 64})


def test_grid_search_records_each_trial_and_keeps_the_best(outcome: Outcome) -> None:
    result, trials, epochs = outcome
    assert [t.state for t in trials] == ["complete", "complete"]
    assert sorted(t.params["lr"] for t in trials) == [0.003, 0.01]
    assert result.best_value == max(t.value for t in trials)
    best = next(t for t in trials if t.value == result.best_value)
    assert result.best_params == best.params
    assert set(best.metrics) == {"val_accuracy", "val_macro_f1", "val_loss", "best_epoch"}
    assert len(epochs) == 4 and len(result.history) == 2
    assert {"train_loss", "val_loss", "val_macro_f1", "seconds", "images_per_s"} <= set(
        result.history[0]
    )
    assert result.best_value > 0.5  # the shapes are easy: better than chance after 2 epochs
    assert all(v.dtype in (np.float32, np.int64) for v in result.state.values())


def test_median_pruner_stops_a_hopeless_trial_after_the_first_epoch(data: Data) -> None:
    trials: list[trainer.TrialResult] = []
    # Seed 1 makes Optuna's grid run lr=0.01 first; lr=1e-6 then learns nothing and is
    # pruned at epoch 2 (the first epoch is never pruned: n_warmup_steps=1).
    params = config(space={"lr": [0.01, 1e-6]}, pruner="median")
    params = params.model_copy(update={"epochs": 3, "seed": 1})
    result = run_search(data, params, on_trial=trials.append)
    assert [(t.params["lr"], t.state, t.epochs) for t in trials] == [
        (0.01, "complete", 3),
        (1e-6, "pruned", 2),
    ]
    assert trials[1].value is None and trials[1].metrics["best_epoch"] == 1
    assert result.best_params == {"lr": 0.01}


def test_same_seed_gives_identical_weights(data: Data, outcome: Outcome) -> None:
    again = run_search(data, config(space={"lr": [0.01, 0.003]}))
    first = outcome[0]
    assert again.best_params == first.best_params
    assert again.state.keys() == first.state.keys()
    for key, value in first.state.items():
        np.testing.assert_array_equal(again.state[key], value, err_msg=key)


def test_export_onnx_is_one_file_matching_torch(
    outcome: Outcome, data: Data, tmp_path: Path
) -> None:
    result = outcome[0]
    model = trainer.load_state(result.spec, result.state)
    path = tmp_path / "model.onnx"
    trainer.export_onnx(model, SIZE, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape[0]) for i in session.get_inputs()] == [("input", "batch")]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    val_x = data[2]
    for n in (5, 1):  # the batch axis is dynamic
        expected = trainer.predict_logits(model, val_x[:n])
        pixels = val_x[:n].transpose(0, 3, 1, 2).astype(np.float32)
        (got,) = session.run(["logits"], {"input": pixels})
        assert got.shape == (n, CLASSES)
        np.testing.assert_allclose(got, expected, atol=1e-4)


def test_predict_logits_from_spec_and_state(outcome: Outcome, data: Data) -> None:
    result = outcome[0]
    logits = trainer.predict_logits((result.spec, result.state), data[2][:7], batch_size=4)
    assert logits.shape == (7, CLASSES) and logits.dtype == np.float32


def test_weights_for_another_spec_are_rejected(outcome: Outcome) -> None:
    result = outcome[0]
    with pytest.raises(ConfigError, match="weights do not fit"):
        trainer.load_state(ModelSpec("cnn", CLASSES, SIZE, depth=3, width=8), result.state)


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"input_size": [32, 64]}, "train.search.space.input_size is fixed"),
        ({"colour": [1]}, "searchable keys: lr, weight_decay, batch_size"),
        ({"lr": []}, "non-empty list"),
        ({"lr": [-1.0]}, "train.search.space.lr: Input should be greater than 0"),
    ],
)
def test_bad_search_space_is_a_config_error(
    data: Data, space: dict[str, list[Any]], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        run_search(data, config(space=space))


def test_failed_trials_are_recorded_and_reported(data: Data, user_module: str) -> None:
    trials: list[trainer.TrialResult] = []
    params = config(space={"lr": [0.01]}).model_copy(
        update={"architecture": f"{user_module}:FailsInTraining"}
    )
    with pytest.raises(PipelineError, match="no trial completed .*RuntimeError: boom"):
        run_search(data, params, on_trial=trials.append)
    assert [(t.state, t.value) for t in trials] == [("failed", None)]


def test_augment_batch_keeps_shape_and_pixel_range(data: Data) -> None:
    batch = torch.from_numpy(data[0][:8])
    out = trainer.augment_batch(batch, torch.Generator().manual_seed(0))
    assert out.shape == (8, 3, SIZE, SIZE) and out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 255.0
    assert not torch.equal(out, trainer.as_input(batch))

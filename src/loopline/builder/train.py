"""Train: grid search over the configured space with Optuna, keep the best model's weights."""

from __future__ import annotations

from typing import Any

import pandas as pd

from loopline.builder.images import label_indices, load_images
from loopline.config import TrainConfig
from loopline.errors import require_extra
from loopline.pipeline import StepContext


class TrainParams(TrainConfig):
    """The train section plus the label list from ``data.labels``."""

    labels: list[str]


def train(ctx: StepContext, splits: pd.DataFrame, params: TrainParams) -> dict[str, Any]:
    require_extra("torch", "train")
    from loopline.builder import trainer

    train_df = splits[splits["split"] == "train"]
    val_df = splits[splits["split"] == "val"]
    size = params.input_size
    train_x = load_images(ctx, train_df, size, "train images")
    val_x = load_images(ctx, val_df, size, "validation images")
    train_y = label_indices(train_df, params.labels)
    val_y = label_indices(val_df, params.labels)

    search = params.search
    n_trials = _grid_size(search.space) if search.sampler == "grid" else (search.n_trials or 4)
    bar = ctx.progress(n_trials * params.epochs, "training")

    def on_trial(t: Any) -> None:
        ctx.record_trial(
            t.number,
            state=t.state,
            params=t.params,
            metrics=t.metrics,
            value=t.value,
            epochs=t.epochs,
            duration_s=t.duration_s,
        )
        value = f"{t.value:.4f}" if t.value is not None else "-"
        ctx.log(f"trial {t.number} {t.state}: {t.params} val_macro_f1={value} ({t.epochs} epochs)")

    def on_epoch(trial: int, epoch: int, stats: dict[str, Any]) -> None:
        bar.advance()

    outcome = trainer.search(
        train_x,
        train_y,
        val_x,
        val_y,
        params,
        len(params.labels),
        on_trial=on_trial,
        on_epoch=on_epoch,
        log=ctx.log,
    )
    bar.close()
    ctx.log(f"best trial: {outcome.best_params} val_macro_f1={outcome.best_value:.4f}")
    return {
        "weights": outcome.state,
        "model": {
            "spec": outcome.spec.to_dict(),
            "labels": params.labels,
            "best_params": outcome.best_params,
            "best_value": outcome.best_value,
            "history": outcome.history,
        },
    }


def architecture_modules(params: Any) -> list[str]:
    """The user's module a step runs for ``params.architecture`` (none for the built-in CNN,
    whose module Loopline's own import scan already covers)."""
    module, sep, _ = str(params.architecture).partition(":")
    return [module] if sep and module else []


def _grid_size(space: dict[str, list[Any]]) -> int:
    n = 1
    for values in space.values():
        n *= max(len(values), 1)
    return n

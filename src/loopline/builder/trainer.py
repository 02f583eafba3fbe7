"""Training for the Build pipeline: model specs, one fit, an Optuna search, ONNX export.

This is the only part of the build that imports torch; the train and package steps import
it lazily, so ``import loopline`` stays light. Images arrive decoded as uint8
[N, H, W, 3]; models take raw pixels float32 [N, 3, H, W] and normalise inside
``forward``, so the exported ONNX file needs only decode and resize in front of it.

Speed on a CPU comes from keeping whole arrays as tensors in memory (no DataLoader, no
worker processes), an NHWC uint8 batch viewed as channels-last NCHW (no copy), and
augmentation done per batch with vectorised torch ops.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from loopline.config import TrainConfig
from loopline.errors import ConfigError, LooplineError, PipelineError

# TrainConfig fields a search may vary. input_size is not one: images are decoded once.
SEARCHABLE = (
    "lr", "weight_decay", "batch_size", "epochs", "patience", "augment",
    "dropout", "depth", "width",
)  # fmt: skip
EVAL_BATCH = 256


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model's module before loading its weights."""

    architecture: str
    num_classes: int
    input_size: int
    depth: int = 3
    width: int = 32
    dropout: float = 0.1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        known = {f.name for f in fields(cls)}
        missing = {"architecture", "num_classes", "input_size"} - d.keys()
        if missing:
            raise ConfigError(f"model spec lacks {', '.join(sorted(missing))}")
        return cls(**{k: v for k, v in d.items() if k in known})

    def with_params(self, params: Any) -> ModelSpec:
        """This spec with depth, width and dropout taken from ``params``."""
        return replace(self, depth=params.depth, width=params.width, dropout=params.dropout)


def build_model(spec: ModelSpec) -> nn.Module:
    """A fresh module for ``spec``: the built-in CNN or a user's class by import path.

    A user's class gets ``num_classes``, plus ``input_size``, ``depth``, ``width`` and
    ``dropout`` where its ``__init__`` names them.
    """
    if spec.architecture == "cnn":
        from loopline.examples.vehicles.cnn import VehicleCNN

        cls: type[nn.Module] = VehicleCNN
    else:
        cls = architecture_class(spec.architecture)
    accepted = inspect.signature(cls.__init__).parameters
    kwargs: dict[str, Any] = {"num_classes": spec.num_classes}
    for name in ("input_size", "depth", "width", "dropout"):
        if name in accepted:
            kwargs[name] = getattr(spec, name)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"cannot build architecture {spec.architecture!r}: {err}") from None


def architecture_class(path: str) -> type[nn.Module]:
    """Import ``package.module:ClassName``; ConfigError unless it is a torch.nn.Module class."""
    module_name, _, name = path.partition(":")
    if not module_name or not name:
        raise ConfigError(f"unknown architecture {path!r}: use 'cnn' or 'package.module:ClassName'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"architecture {path!r}: cannot import {module_name!r}: {err}") from None
    cls = getattr(module, name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ConfigError(f"architecture {path!r}: {name!r} is not a torch.nn.Module class")
    return cls


@dataclass
class TrialResult:
    """One search trial; ``value`` (best val macro-F1) is None unless it completed."""

    number: int
    state: str
    params: dict[str, Any]
    value: float | None
    metrics: dict[str, Any]
    epochs: int
    duration_s: float
    error: str | None = None


@dataclass
class TrainOutcome:
    """The search's best model (spec and weights) and the record of every trial."""

    spec: ModelSpec
    state: dict[str, np.ndarray]
    best_params: dict[str, Any]
    best_value: float
    trials: list[TrialResult]
    history: list[dict[str, Any]]


@dataclass
class FitResult:
    """One training run: the best epoch's model (eval mode) and per-epoch stats."""

    model: nn.Module
    history: list[dict[str, Any]]
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def epochs(self) -> int:
        return len(self.history)


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Use ``n`` intra-op threads inside the block (torch's default when None)."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def as_input(x_uint8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W, 3] to float32 [N, 3, H, W]; NHWC memory is channels-last, no copy."""
    t = torch.from_numpy(x_uint8) if isinstance(x_uint8, np.ndarray) else x_uint8
    return t.permute(0, 3, 1, 2).float()


def augment_batch(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random flip, shift and brightness/contrast for a uint8 [B, H, W, 3] batch.

    Returns float32 [B, 3, H, W] in 0..255. A shift of up to H/16 pixels repeats the edge
    (the pad+crop of torchvision, with replicate padding); one gather does flip and shift.
    """
    b, h, w, _ = x.shape
    pad = max(1, h // 16)
    dy = torch.randint(-pad, pad + 1, (b, 1), generator=gen)
    dx = torch.randint(-pad, pad + 1, (b, 1), generator=gen)
    flip = torch.rand(b, 1, generator=gen) < 0.5
    cols = torch.arange(w).expand(b, w)
    cols = torch.where(flip, w - 1 - cols, cols)
    rows = (torch.arange(h) + dy).clamp_(0, h - 1)
    cols = (cols + dx).clamp_(0, w - 1)
    out = as_input(x[torch.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]])
    contrast = 1.0 + (torch.rand(b, 1, 1, 1, generator=gen) - 0.5) * 0.4
    brightness = (torch.rand(b, 1, 1, 1, generator=gen) - 0.5) * 40.0
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    return ((out - mean) * contrast + mean + brightness).clamp_(0.0, 255.0)


def classification_metrics(logits: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Loss, accuracy and macro-F1 over the classes present in ``y`` or predicted."""
    n, c = logits.shape
    pred = logits.argmax(1)
    confusion = torch.bincount(y * c + pred, minlength=c * c).reshape(c, c).double()
    tp = confusion.diag()
    support, predicted = confusion.sum(1), confusion.sum(0)
    present = (support + predicted) > 0
    f1 = 2 * tp / (support + predicted).clamp(min=1)
    return {
        "val_loss": float(F.cross_entropy(logits, y)),
        "val_accuracy": float(tp.sum() / max(n, 1)),
        "val_macro_f1": float(f1[present].mean()) if bool(present.any()) else 0.0,
    }


def fit(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    spec: ModelSpec,
    params: TrainConfig,
    *,
    on_epoch: Callable[[int, dict[str, Any]], None] | None = None,
) -> FitResult:
    """Train one model with fixed hyper-parameters and keep its best epoch.

    AdamW with a per-step cosine schedule; early stopping when val macro-F1 has not
    improved for ``params.patience`` epochs. Seeded by ``params.seed``: the same inputs
    give the same weights. ``on_epoch(epoch, stats)`` runs after each epoch's validation
    (epochs count from 1) and may raise to stop the run, as Optuna pruning does.
    """
    torch.manual_seed(params.seed)
    rng = np.random.default_rng(params.seed)
    gen = torch.Generator().manual_seed(params.seed)
    xs, ys = torch.from_numpy(np.ascontiguousarray(train_x)), torch.from_numpy(train_y)
    xv, yv = torch.from_numpy(np.ascontiguousarray(val_x)), torch.from_numpy(val_y)
    n, bs = len(xs), params.batch_size
    # A last batch of one image would break BatchNorm in training mode: it is dropped.
    steps = n // bs + (1 if n % bs > 1 else 0)
    with torch_threads(params.threads):
        model = build_model(spec).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        opt = torch.optim.AdamW(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, params.epochs * steps))
        history: list[dict[str, Any]] = []
        best: dict[str, Any] = {"val_macro_f1": -1.0}
        best_state: dict[str, torch.Tensor] = {}
        for epoch in range(1, params.epochs + 1):
            start = time.perf_counter()
            model.train()
            order = torch.from_numpy(rng.permutation(n))
            loss_sum = torch.zeros(())
            seen = 0
            for i in range(steps):
                idx = order[i * bs : (i + 1) * bs]
                xb = augment_batch(xs[idx], gen) if params.augment else as_input(xs[idx])
                loss = F.cross_entropy(model(xb), ys[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                loss_sum += loss.detach() * len(idx)
                seen += len(idx)
            train_s = time.perf_counter() - start
            train_loss = float(loss_sum) / max(seen, 1)
            if not math.isfinite(train_loss):
                raise FloatingPointError(f"training diverged at epoch {epoch} (loss {train_loss})")
            stats = {"epoch": epoch, "train_loss": train_loss, "lr": sched.get_last_lr()[0]}
            stats.update(classification_metrics(_logits(model, xv), yv))
            stats["seconds"] = time.perf_counter() - start
            stats["images_per_s"] = seen / train_s if train_s > 0 else 0.0
            history.append(stats)
            if stats["val_macro_f1"] > best["val_macro_f1"]:
                best = stats
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if on_epoch is not None:
                on_epoch(epoch, stats)
            if epoch - best["epoch"] >= params.patience:
                break
        model.load_state_dict(best_state)
        model.eval()
    return FitResult(model=model, history=history, metrics=best_metrics(history))


def best_metrics(history: list[dict[str, Any]]) -> dict[str, Any]:
    """The validation metrics of the first epoch with the highest macro-F1."""
    top = max(history, key=lambda s: s["val_macro_f1"], default=None)
    if top is None:
        return {}
    keys = ("val_accuracy", "val_macro_f1", "val_loss")
    return {**{k: top[k] for k in keys}, "best_epoch": top["epoch"]}


def _logits(model: nn.Module, x: torch.Tensor, batch_size: int = EVAL_BATCH) -> torch.Tensor:
    """Logits for uint8 NHWC ``x`` in eval mode; the model's mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            parts = [model(as_input(x[i : i + batch_size])) for i in range(0, len(x), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(parts).float() if parts else torch.zeros((0, 0))


def predict_logits(
    model: nn.Module | tuple[ModelSpec, dict[str, np.ndarray]],
    x_uint8: np.ndarray,
    batch_size: int = EVAL_BATCH,
) -> np.ndarray:
    """float32 logits [N, C] for uint8 images [N, H, W, 3]; ``model`` may be (spec, state)."""
    if isinstance(model, tuple):
        model = load_state(*model)
    x = torch.from_numpy(np.ascontiguousarray(x_uint8))
    return _logits(model, x, batch_size).numpy()


def state_to_numpy(model: nn.Module) -> dict[str, np.ndarray]:
    """The state dict as C-contiguous numpy arrays (floats as float32, counters as int64)."""
    out = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu().contiguous()
        out[k] = (v.float() if v.is_floating_point() else v).numpy().copy()
    return out


def load_state(spec: ModelSpec, state: dict[str, np.ndarray]) -> nn.Module:
    """Rebuild ``spec`` and load ``state`` into it; returns the module in eval mode."""
    model = build_model(spec)
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except RuntimeError as err:  # shape mismatch
        raise ConfigError(f"weights do not fit {spec.architecture!r}: {err}") from None
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ConfigError(
            f"weights do not fit {spec.architecture!r}: missing {missing[:3]}, "
            f"unexpected {list(unexpected)[:3]}"
        )
    return model.eval()


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Hide the exporter's notes (missing torchvision ops, deprecations): not the user's."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        logger.setLevel(level)


def export_onnx(model: nn.Module, input_size: int, path: Path, opset: int = 18) -> None:
    """Write ``model`` as one self-contained ONNX file (weights inline, no ``.data`` file).

    Input ``input`` float32 [N, 3, H, W] raw pixels, output ``logits`` [N, C], with a
    dynamic batch axis. The example batch has 2 images so the exporter cannot
    specialise the batch size to 1.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data_file = path.with_name(path.name + ".data")  # where the exporter puts external data
    data_file.unlink(missing_ok=True)
    was_training = model.training
    model.eval()
    example = torch.zeros(2, 3, input_size, input_size)
    try:
        with _quiet_exporter():
            torch.onnx.export(
                model,
                (example,),
                str(path),
                input_names=["input"],
                output_names=["logits"],
                opset_version=opset,
                dynamo=True,
                external_data=False,
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                verbose=False,
            )
    except Exception as err:
        raise PipelineError(
            f"cannot export {type(model).__name__} to ONNX (opset {opset}): "
            f"{str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}"
        ) from err
    finally:
        model.train(was_training)
    if data_file.exists() or not path.is_file():
        raise PipelineError(f"ONNX export to {path} did not produce one self-contained file")


def check_space(params: TrainConfig) -> dict[str, list[Any]]:
    """The search space with values validated as TrainConfig fields; ConfigError if not."""
    allowed = ", ".join(SEARCHABLE)
    space: dict[str, list[Any]] = {}
    for key, values in params.search.space.items():
        where = f"train.search.space.{key}"
        if key not in SEARCHABLE:
            why = "is fixed for a build (images are decoded once)" if key == "input_size" else ""
            raise ConfigError(f"{where} {why or 'is not searchable'}; searchable keys: {allowed}")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: expected a non-empty list of values")
        try:
            space[key] = [getattr(TrainConfig.model_validate({key: v}), key) for v in values]
        except ValidationError as err:
            raise ConfigError(f"{where}: {err.errors()[0]['msg']}") from None
    return space


def _check_inputs(
    train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, classes: int
) -> None:
    for name, x, y in (("train", train_x, train_y), ("validation", val_x, val_y)):
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3 or len(x) != len(y):
            raise ConfigError(f"{name} images must be uint8 [N, H, W, 3] with N labels")
        if len(y) and (y.min() < 0 or y.max() >= classes):
            raise ConfigError(f"{name} labels must be in 0..{classes - 1}")
    if len(train_x) < 2 or len(val_x) < 1:
        raise ConfigError("training needs at least 2 train images and 1 validation image")


def _sampler(params: TrainConfig, space: dict[str, list[Any]]) -> tuple[Any, int]:
    search, seed = params.search, params.seed
    if search.sampler == "grid":
        size = math.prod(len(v) for v in space.values())
        return optuna.samplers.GridSampler(space, seed=seed), search.n_trials or size
    if search.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed), search.n_trials or 4
    return optuna.samplers.TPESampler(seed=seed), search.n_trials or 4


def search(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    params: TrainConfig,
    num_classes: int,
    *,
    on_trial: Callable[[TrialResult], None] | None = None,
    on_epoch: Callable[[int, int, dict[str, Any]], None] | None = None,
    log: Callable[[str], None] = lambda m: None,
) -> TrainOutcome:
    """Search ``params.search.space`` with Optuna, maximising val macro-F1.

    Every trial trains with :func:`fit` from the same seed, so trials differ only by their
    hyper-parameters and the same inputs give the same outcome. A trial that raises a
    non-Loopline error is recorded as failed and the search goes on; a LooplineError
    (a configuration problem) stops it. ``on_trial`` gets each trial's result as it ends,
    ``on_epoch(trial, epoch, stats)`` each epoch's stats.
    """
    space = check_space(params)
    _check_inputs(train_x, train_y, val_x, val_y, num_classes)
    base = ModelSpec(params.architecture, num_classes, params.input_size).with_params(params)
    _check_output(base, val_x[:2])
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler, n_trials = _sampler(params, space)
    pruner = (
        optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=1)
        if params.search.pruner == "median"
        else optuna.pruners.NopPruner()
    )
    log(f"search: {params.search.sampler} sampler, {n_trials} trial(s), space {space}")
    trials: list[TrialResult] = []
    best: dict[str, Any] = {}

    def objective(trial: optuna.Trial) -> float:
        chosen = {k: trial.suggest_categorical(k, v) for k, v in space.items()}
        trial_params = params.model_copy(update=chosen)
        spec = base.with_params(trial_params)
        seen: list[dict[str, Any]] = []
        start = time.perf_counter()

        def finish(state: str, value: float | None, error: str | None = None) -> None:
            result = TrialResult(
                trial.number, state, chosen, value, best_metrics(seen), len(seen),
                time.perf_counter() - start, error,
            )  # fmt: skip
            trials.append(result)
            if on_trial is not None:
                on_trial(result)

        def report(epoch: int, stats: dict[str, Any]) -> None:
            seen.append(stats)
            if on_epoch is not None:
                on_epoch(trial.number, epoch, stats)
            # Steps count from 0, so n_warmup_steps=1 never prunes after the first epoch.
            trial.report(stats["val_macro_f1"], epoch - 1)
            if trial.should_prune():
                raise optuna.TrialPruned()

        try:
            fitted = fit(train_x, train_y, val_x, val_y, spec, trial_params, on_epoch=report)
        except optuna.TrialPruned:
            finish("pruned", None)
            raise
        except LooplineError:
            raise
        except Exception as err:  # one bad trial (diverged, out of memory) is not the search
            log(f"trial {trial.number} failed: {type(err).__name__}: {err}")
            finish("failed", None, f"{type(err).__name__}: {err}")
            return float("nan")  # Optuna records a NaN objective as a failed trial
        value = float(fitted.metrics["val_macro_f1"])
        finish("complete", value)
        if not best or value > best["value"]:
            best.update(
                value=value, params=chosen, spec=spec, history=fitted.history,
                state=state_to_numpy(fitted.model),
            )  # fmt: skip
        return value

    study = optuna.create_study(direction="maximize", sampler=sampler, pruner=pruner)
    with torch_threads(params.threads):
        study.optimize(objective, n_trials=n_trials)
    if not best:
        errors = [t.error for t in trials if t.error]
        raise PipelineError(
            f"no trial completed ({len(errors)} failed, {len(trials) - len(errors)} pruned)"
            + (f"; first error: {errors[0]}" if errors else "")
        )
    return TrainOutcome(
        spec=best["spec"],
        state=best["state"],
        best_params=best["params"],
        best_value=best["value"],
        trials=trials,
        history=best["history"],
    )


def _check_output(spec: ModelSpec, sample: np.ndarray) -> None:
    """Build the model once and run two images through it, to fail fast on a bad module."""
    model = build_model(spec)
    try:
        out = predict_logits(model, sample)
    except Exception as err:
        raise ConfigError(f"architecture {spec.architecture!r} failed on a batch: {err}") from None
    if out.shape != (len(sample), spec.num_classes):
        raise ConfigError(
            f"architecture {spec.architecture!r} returned shape {tuple(out.shape)}; "
            f"expected [N, {spec.num_classes}] logits"
        )

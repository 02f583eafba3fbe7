"""Train throughput: loopline's ``fit`` against a plain PyTorch loop on the same work.

Both sides train the same model (built by ``build_model``, channels-last), on the same
in-memory uint8 arrays, with the same batch size, epochs, AdamW and, when on, the same
vectorised augmentation; both validate once per epoch in ``inference_mode``. What
``fit`` does on top, and so what the ratio measures: a per-step cosine LR schedule, loss,
accuracy and macro-F1 on validation, a copy of the best epoch's weights, early-stopping
bookkeeping and per-epoch stats. The plain loop computes validation accuracy only.

Throughput = training images x epochs / wall seconds of the whole call (model build and
validation included), best of ``--repeats`` alternating runs. Target: ratio >= 0.95.

    python benchmarks/train_bench.py --images 2000 --epochs 2
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from loopline.builder.trainer import ModelSpec, as_input, augment_batch, build_model, fit
from loopline.config import TrainConfig

SIZE = 64


def lake_arrays(images: int, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Decoded uint8 [N, 64, 64, 3] images and labels from a generated lake."""
    try:
        from loopline.bundle import PreprocessSpec, decode_image
        from loopline.examples.vehicles.datagen import CLASSES, generate_lake
    except ImportError:
        return *shapes(images, seed), "synthetic shapes (datagen not available)"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        generate_lake(out, images=images, seed=seed, defect_rate=0.0)
        spec = PreprocessSpec(height=SIZE, width=SIZE)
        xs, ys = [], []
        with open(out / "manifest.csv", newline="") as f:
            for row in csv.DictReader(f):
                xs.append(decode_image((out / row["path"]).read_bytes(), spec))
                ys.append(CLASSES.index(row["label"]))
    return np.stack(xs), np.array(ys, dtype=np.int64), "generated vehicle lake, PNG decoded"


def shapes(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Noise with one of five bright shapes, when the lake generator is not there."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 5
    x = rng.integers(0, 90, (n, SIZE, SIZE, 3), dtype=np.uint8)
    for i, label in enumerate(y):
        r, c = rng.integers(8, 24, 2)
        h, w = [(24, 24), (40, 8), (8, 40), (16, 32), (32, 16)][label]
        x[i, r : r + h, c : c + w] = 220
    return x, y.astype(np.int64)


def plain_loop(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    spec: ModelSpec,
    params: TrainConfig,
) -> float:
    """The minimal loop: forward, loss, backward, step; accuracy on validation per epoch."""
    torch.manual_seed(params.seed)
    gen = torch.Generator().manual_seed(params.seed)
    xs, ys = torch.from_numpy(train_x), torch.from_numpy(train_y)
    xv, yv = torch.from_numpy(val_x), torch.from_numpy(val_y)
    model = build_model(spec).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    n, bs = len(xs), params.batch_size
    steps = n // bs + (1 if n % bs > 1 else 0)  # as fit: no last batch of one image
    accuracy = 0.0
    for _ in range(params.epochs):
        model.train()
        order = torch.randperm(n, generator=gen)
        for i in range(steps):
            idx = order[i * bs : (i + 1) * bs]
            xb = augment_batch(xs[idx], gen) if params.augment else as_input(xs[idx])
            loss = F.cross_entropy(model(xb), ys[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        with torch.inference_mode():
            pred = torch.cat(
                [model(as_input(xv[i : i + 256])).argmax(1) for i in range(0, len(xv), 256)]
            )
        accuracy = float((pred == yv).float().mean())
    return accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="training images")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-augment", action="store_true")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    val_n = max(args.images // 4, 1)
    start = time.perf_counter()
    x, y, source = lake_arrays(args.images + val_n, seed=7)
    train_x, train_y, val_x, val_y = (
        x[: args.images],
        y[: args.images],
        x[args.images :],
        y[args.images :],
    )
    params = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, augment=not args.no_augment,
        patience=args.epochs,
    )  # fmt: skip
    spec = ModelSpec("cnn", 5, SIZE, params.depth, params.width, params.dropout)
    print(
        f"data: {source}: {len(train_x)} train / {len(val_x)} val images {SIZE}x{SIZE} "
        f"({time.perf_counter() - start:.1f} s to prepare)"
    )
    print(
        f"model: cnn depth {spec.depth} width {spec.width}; batch {params.batch_size}, "
        f"{params.epochs} epochs, augment {'on' if params.augment else 'off'}, "
        f"torch threads {torch.get_num_threads()}"
    )

    # Warm up oneDNN's kernels so the first timed run does not pay for them.
    plain_loop(train_x[:256], train_y[:256], val_x[:64], val_y[:64], spec, params)
    runs: dict[str, list[float]] = {"plain PyTorch loop": [], "loopline fit": []}
    for _ in range(args.repeats):
        t = time.perf_counter()
        plain_loop(train_x, train_y, val_x, val_y, spec, params)
        runs["plain PyTorch loop"].append(time.perf_counter() - t)
        t = time.perf_counter()
        fitted = fit(train_x, train_y, val_x, val_y, spec, params)
        runs["loopline fit"].append(time.perf_counter() - t)
        assert fitted.epochs == params.epochs, "fit stopped early: the work would differ"

    work = len(train_x) * params.epochs
    print(f"\n{'':20} {'best s':>8} {'images/s':>10}   all runs (s)")
    for name, times in runs.items():
        print(
            f"{name:20} {min(times):8.2f} {work / min(times):10.0f}   "
            + " ".join(f"{t:.2f}" for t in times)
        )
    ratio = min(runs["plain PyTorch loop"]) / min(runs["loopline fit"])
    print(f"\ntrain throughput ratio (loopline / plain): {ratio:.2f}x")


if __name__ == "__main__":
    main()

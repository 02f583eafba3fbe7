"""Ingest + validate throughput against plain Pillow decoding of the same files.

Both sides read every image of a generated lake from disk; the baseline only decodes each
file with Pillow in a plain loop, while Loopline's ingest hashes every file and records a
dataset version, and validate checks schema, labels, duplicates and decodes every image
(recording step runs and artifacts in SQLite and the artifact store). Prints images/s and
the ratio (Loopline / plain).

    python benchmarks/ingest_bench.py --images 2000
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import pandas as pd
from PIL import Image

from loopline.builder.pipeline import build_pipeline
from loopline.builder.record import BuildRecorder
from loopline.builder.resources import BuildResources
from loopline.config import parse_config
from loopline.drivers.artifacts import ArtifactStore
from loopline.drivers.metadata.store import MetadataStore
from loopline.examples.vehicles.datagen import generate_lake
from loopline.pipeline import Runner


def plain_pillow(lake: Path) -> float:
    paths = pd.read_csv(lake / "manifest.csv", dtype=str)["path"].tolist()
    t0 = time.perf_counter()
    for p in paths:
        try:
            with Image.open(io.BytesIO((lake / p).read_bytes())) as img:
                img.load()
        except Exception:
            pass
    return len(paths) / (time.perf_counter() - t0)


def loopline_ingest_validate(lake: Path, work: Path) -> float:
    config = parse_config({"data": {"source": {"uri": str(lake)}}}, work)
    store = MetadataStore(f"sqlite:///{work / 'bench.db'}")
    artifacts = ArtifactStore(str(work / "artifacts"))
    resources = BuildResources(config=config, store=store, artifacts=artifacts)
    pipeline = build_pipeline().until("validate")
    recorder = BuildRecorder(store, artifacts, project="bench", model_name=config.model.name)
    runner = Runner(
        store, artifacts, resources=resources.for_steps(), use_cache=False, recorder=recorder
    )
    n = len(pd.read_csv(lake / "manifest.csv", dtype=str))
    # Timed: the two steps as the engine runs them (store set-up is a one-off, outside).
    t0 = time.perf_counter()
    runner.run(pipeline, config.to_dict(), project="bench")
    return n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        lake = Path(tmp) / "lake"
        generate_lake(lake, images=args.images, seed=1)
        plain_pillow(lake)  # warm the page cache for both sides
        plain, ours = [], []
        for i in range(args.repeats):
            plain.append(plain_pillow(lake))
            work = Path(tmp) / f"work{i}"
            work.mkdir()
            ours.append(loopline_ingest_validate(lake, work))
        best_plain, best_ours = max(plain), max(ours)
        print(f"{'pipeline':<40}{'images/s':>12}")
        print(f"{'plain Pillow decode (1 thread)':<40}{best_plain:>12.0f}")
        print(f"{'loopline ingest + validate':<40}{best_ours:>12.0f}")
        print(
            f"ingest+validate throughput ratio (loopline / plain Pillow): "
            f"{best_ours / best_plain:.2f}x"
        )


if __name__ == "__main__":
    main()

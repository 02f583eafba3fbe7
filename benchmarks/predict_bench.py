"""Bulk inference benchmark: ``predict_source`` against in-process limits, same run.

On a generated lake (``loopline.examples.vehicles.datagen``: 96x72 PNGs, ~3% broken) and
the production-default model (64x64 input, 3 conv layers of width 32, registered as
``vehicles:1``), prints images/s of

* ``predict_source`` end to end (model load, listing, reading, sha256, decoding, inference
  and the Parquet file, all included), for each number of decoding processes, and its
  steady rate (from the first batch answered to the last);
* the in-process ONNX Runtime batch limit: ``session.run`` on pre-decoded batches of the
  same size, with the same ONNX Runtime threads as ``predict_source`` (one), and the
  machine's ORT ceiling (the best of one session over all cores, or one thread per core);
* the decode+infer limit: the same ``decode_image`` + ``to_input`` + ``session.run`` on
  bytes already in memory, in one thread, and that times the cores (perfect scaling);

then the ratios of ``predict_source`` to each. Decoding a PNG costs about twice running
the small model on it, so the ORT-only ratio cannot reach 1 on a CPU: it says how much of
the time goes to decoding; the decode+infer ratio says how well the pipeline uses the
cores. With ``--rounds N`` everything is measured N times in turn and medians are shown.

    python benchmarks/predict_bench.py [--images 5000] [--batch-size 64] [--rounds 3]

Needs torch (to export the model).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE / "baselines"))


def make_project(root: Path) -> tuple[Path, Path]:
    """Export the model and register its bundle in a fresh project; return config, onnx."""
    from vehicle_model import LABELS, SIZE, export

    from loopline.bundle import PreprocessSpec, write_bundle
    from loopline.config import load_config
    from loopline.deploy.image import image_context_files
    from loopline.drivers.artifacts.store import ArtifactStore
    from loopline.drivers.metadata.store import MetadataStore

    onnx_path, _ = export(root)
    config = root / "loopline.yaml"
    config.write_text("project: bench\nmodel: {name: vehicles}\n")
    cfg = load_config(config)
    files = {
        "model.onnx": onnx_path.read_bytes(),
        "labels.json": json.dumps(LABELS).encode(),
        "preprocess.json": json.dumps(PreprocessSpec(height=SIZE, width=SIZE).to_dict()).encode(),
        "metadata.json": json.dumps({"name": "vehicles"}).encode(),
        **image_context_files(),
    }
    write_bundle(files, root / "bundle.tar")
    ref = ArtifactStore(cfg.artifacts_url()).put_file(root / "bundle.tar")
    store = MetadataStore(cfg.metadata_url())
    store.models.register("vehicles", bundle_uri=ref.uri, bundle_sha256=ref.sha256)
    store.close()
    return config, onnx_path


def session(onnx_path: Path, threads: int) -> Any:
    from loopline.bundle import PreprocessSpec
    from loopline.deploy.runtime import ModelRuntime

    runtime = ModelRuntime(
        onnx_path, ["car", "van", "truck", "bus", "motorcycle"], PreprocessSpec(64, 64),
        intra_op_threads=threads,
    )  # fmt: skip
    return runtime.session


def rate(n: int, fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t0)


def limits(onnx_path: Path, images: list[bytes], batch: int, cores: int) -> dict[str, float]:
    """The in-process limits, in images/s."""
    from loopline.bundle import PreprocessSpec, decode_image, to_input
    from loopline.errors import InvalidInput

    spec = PreprocessSpec(64, 64)

    def decode(data: bytes) -> np.ndarray | None:
        try:
            return decode_image(data, spec)
        except InvalidInput:
            return None

    pixels = [p for p in map(decode, images) if p is not None]
    x = to_input(np.stack(pixels))
    batches = [x[i : i + batch] for i in range(0, len(x), batch)]
    one, many = session(onnx_path, 1), session(onnx_path, cores)
    run1 = lambda b: one.run(["logits"], {"input": b})  # noqa: E731
    for b in batches[:3]:  # warm up both sessions
        run1(b)
        many.run(["logits"], {"input": b})
    out = {"ort_1_thread": rate(len(x), lambda: [run1(b) for b in batches])}
    out[f"ort_{cores}_intra"] = rate(
        len(x), lambda: [many.run(["logits"], {"input": b}) for b in batches]
    )
    with ThreadPoolExecutor(cores) as pool:
        out[f"ort_{cores}_sessions"] = rate(len(x), lambda: list(pool.map(run1, batches)))
    chunks = [images[i : i + batch] for i in range(0, len(images), batch)]

    def decode_infer(chunk: list[bytes]) -> None:
        got = [p for p in map(decode, chunk) if p is not None]
        run1(to_input(np.stack(got)))

    out["decode_1_thread"] = rate(len(images), lambda: [decode(b) for b in images])
    out["decode_infer_1_thread"] = rate(len(images), lambda: [decode_infer(c) for c in chunks])
    out["decode_infer_ideal"] = out["decode_infer_1_thread"] * cores
    return out


def bulk(config: Path, lake: Path, out: Path, batch: int, workers: int) -> dict[str, float]:
    from loopline.deploy.bulk import predict_source

    marks: list[tuple[float, int]] = []
    summary = predict_source(
        "vehicles:1", lake, out, config=config, batch_size=batch, workers=workers,
        progress=lambda done, total: marks.append((time.perf_counter(), done)),
    )  # fmt: skip
    (t_first, n_first), (t_last, n_last) = marks[1], marks[-1]
    steady = (n_last - n_first) / (t_last - t_first) if t_last > t_first else 0.0
    return {"end_to_end": summary.rows / summary.seconds, "steady": steady}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", default=None, help="decoding processes to try, e.g. 0,1,2")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    tried = [int(w) for w in (args.workers or f"0,{cores}").split(",")]

    from loopline.examples.vehicles.datagen import generate_lake

    with tempfile.TemporaryDirectory(prefix="loopline-predict-bench-") as tmp:
        root = Path(tmp)
        config, onnx_path = make_project(root)
        generate_lake(root / "lake", images=args.images, seed=1, cameras=4)
        paths = sorted((root / "lake" / "images").rglob("*.png"))
        images = [p.read_bytes() for p in paths]
        runs: dict[str, list[float]] = {}
        for _ in range(args.rounds):
            for key, value in limits(onnx_path, images, args.batch_size, cores).items():
                runs.setdefault(key, []).append(value)
            for w in tried:
                got = bulk(config, root / "lake", root / "out.parquet", args.batch_size, w)
                for key, value in got.items():
                    runs.setdefault(f"predict_w{w}_{key}", []).append(value)
        med = {key: statistics.median(values) for key, values in runs.items()}
    report(med, args, cores, tried)
    return 0


def report(med: dict[str, float], args: Any, cores: int, tried: list[int]) -> None:
    print(
        f"\n{args.images} images 96x72 PNG, model 64x64 (depth 3, width 32), batch "
        f"{args.batch_size}, {cores} cores, median of {args.rounds} round(s)\n"
    )
    rows = [
        ("ORT batch limit, 1 ORT thread (predict_source's)", med["ort_1_thread"]),
        (f"ORT one session, {cores} intra-op threads", med[f"ort_{cores}_intra"]),
        (f"ORT {cores} threads x 1 intra-op thread", med[f"ort_{cores}_sessions"]),
        ("PNG decode alone, 1 thread", med["decode_1_thread"]),
        ("decode+infer, 1 thread", med["decode_infer_1_thread"]),
        (f"decode+infer ideal, x{cores} cores", med["decode_infer_ideal"]),
    ]
    for w in tried:
        label = "thread" if w == 0 else f"{w} process(es)"
        rows.append(
            (f"predict_source, decode in {label}, end to end", med[f"predict_w{w}_end_to_end"])
        )
        rows.append((f"predict_source, decode in {label}, steady", med[f"predict_w{w}_steady"]))
    for label, value in rows:
        print(f"  {label:<58} {value:8.0f} images/s")
    ort_ceiling = max(med[f"ort_{cores}_intra"], med[f"ort_{cores}_sessions"], med["ort_1_thread"])
    best = max(tried, key=lambda w: med[f"predict_w{w}_end_to_end"])
    e2e, steady = med[f"predict_w{best}_end_to_end"], med[f"predict_w{best}_steady"]
    print(f"\nbest: decode workers {best}")
    for name, base in (
        ("ORT batch limit, 1 ORT thread", med["ort_1_thread"]),
        ("ORT ceiling, all cores", ort_ceiling),
        ("decode+infer, 1 thread", med["decode_infer_1_thread"]),
        (f"decode+infer ideal x{cores}", med["decode_infer_ideal"]),
    ):
        ratios = f"end to end {e2e / base:5.2f}x   steady {steady / base:5.2f}x"
        print(f"  predict_source / {name:<32} {ratios}")


if __name__ == "__main__":
    sys.exit(main())

"""Bulk inference benchmark: ``predict_source`` against in-process limits, same run.

On a generated lake (``loopline.examples.vehicles.datagen``: 96x72 PNGs, ~3% broken) and
the production-default model (64x64 input, 3 conv layers of width 32, registered as
``vehicles:1``), prints images/s and CPU ms per image of

* the in-process ONNX Runtime batch limit: ``session.run`` on pre-decoded batches of the
  same size with the same ONNX Runtime threads as ``predict_source`` (one), and the
  machine's ORT ceiling (one session over all cores, or one thread per core);
* the decode+infer limit: the same ``decode_image`` + ``to_input`` + ``session.run`` on
  bytes already in memory in one thread, and that times the cores (perfect scaling);
* ``predict_source`` for each number of decoding processes (0: a thread): end to end
  (model load and verification, listing, reading, sha256, decoding, inference and the
  Parquet file) and steady (from the first batch answered to the last);

then, for each, its ratios to every limit (per round, median over rounds) and its CPU per
image against the decode+infer loop's. Decoding a PNG costs more than running the small
model on it, so the ratio to the ORT-only limit cannot reach 1 on a CPU: it shows what
decoding costs; the decode+infer ratios show how well the pipeline uses the cores. CPU
per image moves much less than throughput when other jobs share the machine.

    python benchmarks/predict_bench.py [--images 5000] [--batch-size 64] [--rounds 3]
        [--workers 0,1]

Needs torch (to export the model).
"""

from __future__ import annotations

import argparse
import contextlib
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


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and of every process it started, decoding
    workers included: those of the fork server are counted once it has reaped them."""
    import multiprocessing.forkserver
    import resource

    total = time.process_time()
    total += sum(getattr(resource.getrusage(resource.RUSAGE_CHILDREN), f) for f in FIELDS)
    pid = getattr(multiprocessing.forkserver._forkserver, "_forkserver_pid", None)
    if pid:
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += sum(int(v) for v in stat[11:15]) / os.sysconf("SC_CLK_TCK")
    return total


FIELDS = ("ru_utime", "ru_stime")


def measure(n: int, fn: Callable[[], Any]) -> tuple[float, float]:
    """(images/s, CPU ms per image) of ``fn`` handling ``n`` images."""
    c0, t0 = cpu_seconds(), time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    time.sleep(0.2)  # let the fork server reap the workers that just ended
    return n / seconds, (cpu_seconds() - c0) * 1000 / n


def limits(
    onnx_path: Path, images: list[bytes], batch: int, cores: int
) -> dict[str, tuple[float, float]]:
    """The in-process limits: (images/s, CPU ms per image) each."""
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
    out = {"ort_1_thread": measure(len(x), lambda: [run1(b) for b in batches])}
    out["ort_intra"] = measure(
        len(x), lambda: [many.run(["logits"], {"input": b}) for b in batches]
    )
    with ThreadPoolExecutor(cores) as pool:
        out["ort_sessions"] = measure(len(x), lambda: list(pool.map(run1, batches)))
    chunks = [images[i : i + batch] for i in range(0, len(images), batch)]

    def decode_infer(chunk: list[bytes]) -> None:
        got = [p for p in map(decode, chunk) if p is not None]
        run1(to_input(np.stack(got)))

    out["decode_1_thread"] = measure(len(images), lambda: [decode(b) for b in images])
    out["decode_infer_1_thread"] = measure(len(images), lambda: [decode_infer(c) for c in chunks])
    rate, cpu = out["decode_infer_1_thread"]
    out["decode_infer_ideal"] = (rate * cores, cpu)
    return out


def bulk(config: Path, lake: Path, out: Path, batch: int, workers: int) -> dict[str, float]:
    """predict_source's images/s end to end and steady, and its CPU ms per image."""
    from loopline.deploy.bulk import predict_source

    marks: list[tuple[float, int]] = []
    summary: Any = None

    def run() -> None:
        nonlocal summary
        summary = predict_source(
            "vehicles:1", lake, out, config=config, batch_size=batch, workers=workers,
            progress=lambda done, total: marks.append((time.perf_counter(), done)),
        )  # fmt: skip

    _, cpu = measure(1, run)
    (t_first, n_first), (t_last, n_last) = marks[1], marks[-1]
    steady = (n_last - n_first) / (t_last - t_first) if t_last > t_first else 0.0
    return {
        "end_to_end": summary.rows / summary.seconds,
        "steady": steady,
        "cpu_ms": cpu / summary.records,
    }


LIMITS = {
    "ort_1_thread": "ORT batch limit, 1 ORT thread (predict_source's)",
    "ort_intra": "ORT one session, all cores as intra-op threads",
    "ort_sessions": "ORT one thread per core, 1 intra-op thread each",
    "decode_1_thread": "PNG decode alone, 1 thread",
    "decode_infer_1_thread": "decode+infer limit, 1 thread",
    "decode_infer_ideal": "decode+infer limit x cores (perfect scaling)",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", default=None, help="decoding processes to try, e.g. 0,1,2")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    tried = [int(w) for w in (args.workers or f"0,{max(cores - 1, 1)}").split(",")]

    from loopline.examples.vehicles.datagen import generate_lake

    rounds: list[tuple[dict[str, tuple[float, float]], dict[int, dict[str, float]]]] = []
    with tempfile.TemporaryDirectory(prefix="loopline-predict-bench-") as tmp:
        root = Path(tmp)
        config, onnx_path = make_project(root)
        generate_lake(root / "lake", images=args.images, seed=1, cameras=4)
        paths = sorted((root / "lake" / "images").rglob("*.png"))
        images = [p.read_bytes() for p in paths]
        for _ in range(args.rounds):  # limits and runs side by side, round after round
            lim = limits(onnx_path, images, args.batch_size, cores)
            runs = {
                w: bulk(config, root / "lake", root / "out.parquet", args.batch_size, w)
                for w in tried
            }
            rounds.append((lim, runs))
    report(rounds, args, cores, tried)
    return 0


def report(rounds: list[Any], args: Any, cores: int, tried: list[int]) -> None:
    med = statistics.median
    print(
        f"\n{args.images} images 96x72 PNG, model 64x64 (depth 3, width 32), batch "
        f"{args.batch_size}, {cores} cores, medians of {len(rounds)} round(s)\n"
    )
    print(f"  {'':<62} {'images/s':>9} {'CPU ms/img':>11}")
    for key, label in LIMITS.items():
        rate, cpu = med(r[0][key][0] for r in rounds), med(r[0][key][1] for r in rounds)
        print(f"  {label:<62} {rate:9.0f} {cpu:11.3f}")
    for w in tried:
        how = "in a thread" if w == 0 else f"in {w} process(es) + stealing"
        for kind in ("end_to_end", "steady"):
            rate = med(r[1][w][kind] for r in rounds)
            cpu = f"{med(r[1][w]['cpu_ms'] for r in rounds):11.3f}" if kind == "steady" else ""
            print(f"  {f'predict_source, decode {how}, {kind}':<62} {rate:9.0f} {cpu}")

    def ratio(w: int, kind: str, base: Callable[[dict[str, Any]], float]) -> float:
        return med(r[1][w][kind] / base(r[0]) for r in rounds)  # per round, then median

    bases: dict[str, Callable[[dict[str, Any]], float]] = {
        "ORT batch limit (1 ORT thread, same batch)": lambda lim: lim["ort_1_thread"][0],
        "ORT ceiling (best on all cores)": lambda lim: max(
            lim[k][0] for k in ("ort_1_thread", "ort_intra", "ort_sessions")
        ),
        "decode+infer limit, 1 thread": lambda lim: lim["decode_infer_1_thread"][0],
        "decode+infer limit x cores": lambda lim: lim["decode_infer_ideal"][0],
    }
    for w in tried:
        print(f"\npredict_source with {w} decoding process(es), ratios (median per round):")
        for name, base in bases.items():
            e2e, steady = ratio(w, "end_to_end", base), ratio(w, "steady", base)
            print(f"  / {name:<44} end to end {e2e:5.2f}x   steady {steady:5.2f}x")
        cpu = med(r[1][w]["cpu_ms"] / r[0]["decode_infer_1_thread"][1] for r in rounds)
        print(f"  CPU per image / decode+infer's (1 thread)      {cpu:5.2f}x")


if __name__ == "__main__":
    sys.exit(main())

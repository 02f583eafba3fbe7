"""Bulk inference: a model over every record of a lake or warehouse query, to Parquet.

``predict_source`` resolves the model (``NAME[:VERSION|@ALIAS]`` in the registry, its
bundle sha256-verified, or a bundle folder/tar), lists the source's records, and runs the
model in batches. Decoding is the expensive part on a CPU (a small PNG costs about twice
its inference) and Pillow holds the GIL for much of it. On 2 cores one thread decodes,
a few batches ahead, while this one runs ONNX Runtime (which releases the GIL) on the
batches in order. With more cores, a long run decodes in worker processes instead, and
whenever the next batch is not decoded yet this process decodes one itself rather than
wait, so every core keeps working (``auto_workers``).

Pixels come from the same ``decode_image`` and the same ``ModelRuntime`` as the server's,
so a record gets the prediction the server would give its image. A record whose image
cannot be read or decoded is skipped and counted with its reason; it never stops the run.
The Parquet file appears complete or not at all (written to a temporary file, renamed).
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from loopline.bundle import PreprocessSpec, decode_image, to_input
from loopline.deploy.bulk_output import PredictionWriter
from loopline.deploy.resolve import open_data_source, resolve_model, select_records
from loopline.deploy.runtime import ServedModel, softmax
from loopline.digest import sha256_bytes
from loopline.errors import (
    ConfigError,
    ImageTooLarge,
    InvalidInput,
    LooplineError,
    UnsupportedImage,
)
from loopline.images import DEFAULT_MAX_PIXELS

if TYPE_CHECKING:
    from loopline.drivers.data import DataSource

Progress = Callable[[int, int], None]  # (records done, records in all)
MAX_LISTED_FAILURES = 100


@dataclass
class BulkSummary:
    """What a bulk run did. ``images_per_s`` counts predicted images over the whole run
    (model loading and listing included); ``accuracy`` is over rows with a true label."""

    model: str
    version: int
    bundle_sha256: str
    source: str
    out: str
    records: int
    rows: int
    failed: int
    failed_by_reason: dict[str, int]
    failures: list[dict[str, str]]  # the first MAX_LISTED_FAILURES, in record order
    seconds: float
    images_per_s: float
    labelled: int
    accuracy: float | None
    decode_workers: int
    batch_size: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- decoding (in worker processes, or in a thread) ----------------------------------------
@dataclass
class Decoded:
    """One batch decoded: the positions that worked, their pixels and content digests,
    and (position, reason, message) for each that did not."""

    ok: list[int]
    pixels: np.ndarray | None  # uint8 [len(ok), H, W, 3]
    sha256: list[str]
    failures: list[tuple[int, str, str]]


def decode_batch(
    source: DataSource,
    spec: PreprocessSpec,
    paths: list[str],
    expected: list[str],
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Decoded:
    """Read and decode ``paths``; ``expected`` holds the source's sha256 per path (or "")."""
    ok: list[int] = []
    pixels: list[np.ndarray] = []
    digests: list[str] = []
    failures: list[tuple[int, str, str]] = []
    for i, (path, want) in enumerate(zip(paths, expected, strict=True)):
        try:
            data = source.read_bytes(path)
        except Exception as err:  # missing, unsafe, or a remote store's error: this record's
            failures.append((i, "unreadable", str(err) or type(err).__name__))
            continue
        if not data:
            failures.append((i, "empty", "the file is empty"))
            continue
        digest = sha256_bytes(data)
        if want and want != digest:
            failures.append((i, "sha256 mismatch", f"content sha256 {digest} != {want}"))
            continue
        try:
            pixels.append(decode_image(data, spec, max_pixels=max_pixels))
        except Exception as err:  # a hostile file may break the decoder in any way
            failures.append((i, _reason(err), str(err) or type(err).__name__))
            continue
        ok.append(i)
        digests.append(digest)
    return Decoded(ok, np.stack(pixels) if pixels else None, digests, failures)


def _reason(err: Exception) -> str:
    if isinstance(err, UnsupportedImage):
        return "unsupported format"
    if isinstance(err, ImageTooLarge):
        return "too large"
    if isinstance(err, InvalidInput):
        return "undecodable"
    return "decoder error"


_WORKER: tuple[Any, PreprocessSpec, int] | None = None


def _init_worker(source: Any, spec: PreprocessSpec, max_pixels: int) -> None:
    global _WORKER
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _WORKER = (source, spec, max_pixels)


def _decode_in_worker(paths: list[str], expected: list[str]) -> Decoded:
    assert _WORKER is not None
    source, spec, max_pixels = _WORKER
    return decode_batch(source, spec, paths, expected, max_pixels)


def _decoder(source: Any, spec: PreprocessSpec, workers: int) -> tuple[Executor, Callable]:
    """An executor and the function to submit to it: ``workers`` processes, or (0) one
    thread of this process.

    Processes come from a fork server (spawn where there is none): never a fork of this
    process, which runs ONNX Runtime threads, and the server, started once per process
    with the decoding modules imported, forks each worker ready to decode.
    """
    if workers == 0:
        pool: Executor = ThreadPoolExecutor(1, thread_name_prefix="loopline-decode")
        return pool, lambda p, e: decode_batch(source, spec, p, e)
    try:
        pickle.dumps(source)
    except Exception as err:
        raise ConfigError(
            f"the source cannot be sent to decoding processes ({err}); use workers=0"
        ) from None
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx: Any = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
    else:
        ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=_init_worker,
        initargs=(source, spec, DEFAULT_MAX_PIXELS),
    )  # fmt: skip
    return pool, _decode_in_worker


def auto_workers(source: Any, records: int, batch_size: int, cores: int | None = None) -> int:
    """Decoding processes worth starting: on more than 2 cores, one per core but the one
    running ONNX Runtime, for a run of 16 batches or more whose source can be sent to a
    process; else 0 (decode in a thread). On 2 cores a thread measured as fast as one or
    two processes, at less CPU per image and no start-up (benchmarks/predict_bench.py)."""
    cores = cores or os.cpu_count() or 1
    if cores <= 2 or records < 16 * batch_size:
        return 0
    try:
        pickle.dumps(source)
    except Exception:
        return 0
    return cores - 1


# -- the run -----------------------------------------------------------------------------
def predict_source(
    model: str | Path | ServedModel,
    source: str | Path | DataSource,
    out: str | Path,
    *,
    config: str | Path | None = None,
    batch_size: int = 64,
    limit: int | None = None,
    workers: int | None = None,
    intra_op_threads: int = 1,
    progress: Progress | None = None,
) -> BulkSummary:
    """Predict every record of ``source`` with ``model``; write the rows to ``out`` (Parquet).

    Columns: ``path``, ``sha256`` (of the bytes read; a record whose source gives another
    sha256 is skipped), ``label`` (predicted), ``confidence``, ``prob_<label>`` per class,
    ``true_label`` (the source's label; null when it has none), ``model_name``,
    ``model_version``, then the source's metadata columns (``camera_id``, ...).

    ``config`` is the project whose registry resolves ``model``; ``workers`` the decoding
    processes (0: a thread of this process; None: ``auto_workers``). Raises LooplineError
    for a bad model, source or argument; bad images are counted in the summary instead.
    """
    t0 = time.perf_counter()
    if batch_size < 1:
        raise ConfigError(f"batch size {batch_size} must be at least 1")
    if limit is not None and limit < 0:
        raise ConfigError(f"limit {limit} must be 0 or more")
    if workers is not None and workers < 0:
        raise ConfigError(f"workers {workers} must be 0 or more")
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give a file such as predictions.parquet")
    served = (
        model
        if isinstance(model, ServedModel)
        else resolve_model(model, config=config, intra_op_threads=intra_op_threads)
    )
    filters: dict[str, list[str]] = {}
    src: Any = source
    if isinstance(source, str | Path):
        src, filters = open_data_source(source)
    records = select_records(src.list_records(), filters, limit)
    n = len(records)
    if workers is None:
        workers = auto_workers(src, n, batch_size)
    writer = PredictionWriter(out, served, records)
    runtime, spec = served.runtime, served.runtime.spec
    paths = records["path"].astype(str).tolist()
    given = records["sha256"] if "sha256" in records.columns else pd.Series([""] * n)
    expected = given.fillna("").astype(str).tolist()
    failures: list[dict[str, str]] = []
    reasons: Counter[str] = Counter()
    done = 0
    if progress is not None:
        progress(0, n)
    pool, decode = _decoder(src, spec, workers)
    try:
        pending: deque[tuple[int, Future[Decoded]]] = deque()
        starts = iter(range(0, n, batch_size))
        window = 2 * max(workers, 1) + 1

        def chunk(start: int) -> tuple[list[str], list[str]]:
            return paths[start : start + batch_size], expected[start : start + batch_size]

        def fill() -> None:
            while len(pending) < window and (start := next(starts, None)) is not None:
                pending.append((start, pool.submit(decode, *chunk(start))))

        fill()
        while pending:
            # Rather than wait for the workers, decode the next batch here (in order).
            while workers and not pending[0][1].done() and len(pending) < 2 * window:
                if (start := next(starts, None)) is None:
                    break
                stolen: Future[Decoded] = Future()
                stolen.set_result(decode_batch(src, spec, *chunk(start)))
                pending.append((start, stolen))
            start, future = pending.popleft()
            batch = future.result()
            fill()  # the next batch is decoding while this one runs
            if batch.pixels is not None:
                probs = softmax(runtime.run(to_input(batch.pixels)))
                writer.add([start + i for i in batch.ok], batch.sha256, probs)
            for i, reason, message in batch.failures:
                reasons[reason] += 1
                if len(failures) < MAX_LISTED_FAILURES:
                    failures.append({"path": paths[start + i], "reason": reason, "error": message})
            done += len(batch.ok) + len(batch.failures)
            if progress is not None:
                progress(done, n)
        writer.commit()
    except BrokenProcessPool as err:
        writer.abort()
        raise LooplineError(f"a decoding process died ({err}); nothing was written") from None
    except BaseException:
        writer.abort()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    seconds = time.perf_counter() - t0
    return BulkSummary(
        model=served.name,
        version=served.version,
        bundle_sha256=served.bundle_sha256,
        source=str(getattr(src, "uri", source)),
        out=str(out),
        records=n,
        rows=writer.rows,
        failed=sum(reasons.values()),
        failed_by_reason=dict(sorted(reasons.items())),
        failures=failures,
        seconds=round(seconds, 3),
        images_per_s=round(writer.rows / seconds, 1) if seconds > 0 else 0.0,
        labelled=writer.labelled,
        accuracy=writer.correct / writer.labelled if writer.labelled else None,
        decode_workers=workers,
        batch_size=batch_size,
    )

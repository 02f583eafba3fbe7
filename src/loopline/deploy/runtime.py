"""The model at serving time: an ONNX Runtime session behind a dynamic batcher.

Request handlers put jobs (encoded images, or tensors from the v2 protocol) on a queue and
await a future. A batcher thread takes every job that is waiting, decodes the images, runs
the model once on the stacked batch and answers all the jobs with one wake-up of the event
loop (``wakeup.py``: with the GIL released while it wakes the loop). Decoding and inference
therefore never block the event loop, and Pillow and ONNX Runtime release the GIL while
they work, so HTTP keeps being served in parallel. Input statistics for the prediction log
are computed once per batch, not once per job, and only once the batch's answers are on
their way: a lone request does not wait for them (``InputStats``).

Several batcher threads may share the queue and the session (ONNX Runtime sessions are safe
to run concurrently). With one ONNX Runtime thread each, different batches are decoded and
run on different cores, which costs less CPU per image than spreading one batch over a
spinning ONNX Runtime thread pool.

A lone request never waits for company. Once traffic is concurrent (the previous batch held
more than one job) a batch may wait up to ``max_delay_ms`` to fill up to ``max_batch_size``.

Images from cameras nobody controls are hostile until proven otherwise: each job is decoded
on its own (JPEG or PNG only, its pixel count checked from the header before decoding), so
a bad image fails its own request and never the requests batched with it. The queue is
bounded by jobs and by bytes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from loopline.bundle import Bundle, PreprocessSpec, decode_image, to_input
from loopline.deploy.wakeup import Answer, WakerSet
from loopline.errors import InvalidInput, LooplineError, UndecodableImage
from loopline.images import image_stats

log = logging.getLogger("loopline.deploy")


class Overloaded(LooplineError):
    """More requests are waiting than the server accepts; retry later."""

    status_code = 503


class ModelRuntime:
    """An ONNX Runtime session over a verified bundle's ``model.onnx``."""

    def __init__(
        self,
        model_path: Path,
        labels: list[str],
        spec: PreprocessSpec,
        *,
        intra_op_threads: int = 1,
        inter_op_threads: int = 1,
    ) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads
        opts.inter_op_num_threads = inter_op_threads
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Spinning worker threads would steal the core the HTTP side runs on.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(
                str(model_path), opts, providers=["CPUExecutionProvider"]
            )
        except Exception as err:  # ORT raises its own exception types
            raise LooplineError(f"ONNX Runtime cannot load {model_path}: {err}") from None
        self.labels = list(labels)
        self.spec = spec
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name: o for o in self.session.get_outputs()}
        if spec.input_name not in inputs or spec.output_name not in outputs:
            raise LooplineError(
                f"{model_path}: expected input {spec.input_name!r} and output "
                f"{spec.output_name!r}, found inputs {sorted(inputs)} and outputs {sorted(outputs)}"
            )
        self.input_name = spec.input_name
        self.output_name = spec.output_name
        shape = inputs[spec.input_name].shape
        expected = [3, spec.height, spec.width]
        if len(shape) != 4 or any(
            isinstance(d, int) and d != e for d, e in zip(shape[1:], expected, strict=True)
        ):
            raise LooplineError(
                f"{model_path}: input shape {shape} does not match preprocess.json "
                f"[N, 3, {spec.height}, {spec.width}]"
            )
        n_out = outputs[spec.output_name].shape[-1]
        if isinstance(n_out, int) and n_out != len(labels):
            raise LooplineError(
                f"{model_path}: the model has {n_out} outputs but labels.json names {len(labels)}"
            )

    @property
    def input_shape(self) -> list[int]:
        """One input item's shape: [3, H, W]."""
        return [3, self.spec.height, self.spec.width]

    def run(self, x: np.ndarray) -> np.ndarray:
        """float32 [N, 3, H, W] pixels 0..255 to float32 logits [N, C]."""
        return self.session.run([self.output_name], {self.input_name: x})[0]


@dataclass
class ServedModel:
    """What a server serves: the model's registered identity and its loaded runtime."""

    name: str
    version: int
    bundle: Bundle
    bundle_sha256: str
    runtime: ModelRuntime

    @property
    def labels(self) -> list[str]:
        return self.runtime.labels


@dataclass
class JobResult:
    """The answer to one job: one row per image."""

    ids: list[str]
    top: np.ndarray  # int [n]
    confidence: np.ndarray  # float32 [n]
    probabilities: np.ndarray  # float32 [n, C]
    logits: np.ndarray  # float32 [n, C]


@dataclass(slots=True)
class Job:
    """One request's work: encoded images or a ready tensor, and where to send the answer."""

    images: list[bytes] | None
    tensor: np.ndarray | None
    n: int
    metadata: dict[str, Any] | None
    source: str
    received: float
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[JobResult]
    nbytes: int = 0  # what the job holds while it waits (the queue's byte bound)
    # filled by the batcher thread
    x: np.ndarray | None = None
    stats: list[dict[str, Any]] = field(default_factory=list)
    sizes: list[int | None] | None = None  # encoded bytes per image (None: a tensor row)


_STOP = object()


class InputStats(dict[str, Any]):
    """One image's input statistics for the prediction log (brightness, contrast, mean_rgb,
    sharpness, saturation, dark_share, bytes), filled in by the batcher thread just after
    the image's answer is delivered.

    A row may hold it at once; whoever reads it first calls ``wait`` (the prediction log
    does, before it writes a row).
    """

    __slots__ = ("_ready",)

    def __init__(self, ready: threading.Event) -> None:
        super().__init__()
        self._ready = ready

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the statistics are filled in; False if ``timeout`` passed first."""
        return self._ready.wait(timeout)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class Batcher:
    """Coalesces concurrent jobs into batches for one ``ModelRuntime`` on one thread.

    ``on_batch(jobs, prediction_per_job, seconds)`` runs on the batcher thread after each
    batch (the prediction log and metrics hook in there, off the request path). Each
    ``job.stats`` then holds one ``InputStats`` per image, filled in right after the answers
    are delivered: keep the objects (the log's rows do) and ``wait()`` before reading them.
    """

    def __init__(
        self,
        runtime: ModelRuntime,
        *,
        max_batch_size: int = 32,
        max_delay_ms: float = 1.0,
        max_queue: int = 2048,
        max_queue_bytes: int = 256 << 20,
        max_pixels: int | None = None,
        threads: int = 1,
        on_batch: Callable[[list[Job], list[JobResult], float], None] | None = None,
    ) -> None:
        self.runtime = runtime
        self.max_batch_size = max_batch_size
        self.max_delay = max_delay_ms / 1000.0
        self.max_queue = max_queue
        self.max_queue_bytes = max_queue_bytes
        self.max_pixels = max_pixels
        self.on_batch = on_batch
        self.threads = threads
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._accepting = False
        self._concurrent = False
        self._bytes_lock = threading.Lock()
        self._queued_bytes = 0
        self._wakers = WakerSet()

    # -- lifecycle (event loop side) ----------------------------------------------------
    def start(self) -> None:
        if self._threads:
            return
        self._accepting = True
        for i in range(self.threads):
            t = threading.Thread(target=self._run, name=f"loopline-batcher-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting, answer every job already queued, then end the thread."""
        self._accepting = False
        for _ in self._threads:
            self._queue.put(_STOP)
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self._threads = []
        # A job that slipped in behind the stop markers still gets an answer.
        rest = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                rest.append(item)
        if rest:
            self._process(rest)

    @property
    def running(self) -> bool:
        return self._accepting and any(t.is_alive() for t in self._threads)

    # -- submitting (event loop side) ---------------------------------------------------
    def submit(
        self,
        *,
        images: list[bytes] | None = None,
        tensor: np.ndarray | None = None,
        metadata: dict[str, Any] | None = None,
        source: str = "v1",
    ) -> asyncio.Future[JobResult]:
        """Queue images (encoded JPEG/PNG) or a float32 [n, 3, H, W] tensor; await the result."""
        if not self._accepting:
            raise Overloaded("the server is shutting down; retry on another replica")
        if self._queue.qsize() >= self.max_queue:
            raise Overloaded(f"more than {self.max_queue} requests are waiting; retry later")
        if images is not None:
            n, nbytes = len(images), sum(len(b) for b in images)
        else:
            assert tensor is not None
            n, nbytes = len(tensor), tensor.nbytes
        # Everything that can fail comes before the bytes are counted: none may leak.
        loop = asyncio.get_running_loop()
        self._wakers.for_loop(loop)
        fut: asyncio.Future[JobResult] = loop.create_future()
        job = Job(images, tensor, n, metadata, source, time.time(), loop, fut, nbytes)
        with self._bytes_lock:
            # A job alone in the queue is always taken, however large: no request is
            # refused forever.
            if self._queued_bytes and self._queued_bytes + nbytes > self.max_queue_bytes:
                raise Overloaded(
                    f"more than {self.max_queue_bytes} bytes of requests are waiting; retry later"
                )
            self._queued_bytes += nbytes
        self._queue.put(job)
        return fut

    @property
    def queued_bytes(self) -> int:
        """Bytes held by the jobs waiting in the queue."""
        return self._queued_bytes

    # -- the batcher thread ----------------------------------------------------------------
    def _run(self) -> None:
        stopping = False
        while not stopping:
            job = self._queue.get()
            if job is _STOP:
                break
            jobs = [job]
            n = job.n
            deadline = None
            while n < self.max_batch_size:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    if not self._concurrent or self.max_delay <= 0:
                        break
                    if deadline is None:
                        deadline = time.monotonic() + self.max_delay
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    try:
                        nxt = self._queue.get(timeout=remaining)
                    except queue.Empty:
                        break
                if nxt is _STOP:
                    stopping = True
                    break
                jobs.append(nxt)
                n += nxt.n
            self._concurrent = len(jobs) > 1
            self._process(jobs)

    def _process(self, jobs: list[Job]) -> None:
        taken = sum(j.nbytes for j in jobs)
        with self._bytes_lock:
            self._queued_bytes -= taken
        answers: list[tuple[Job, JobResult | None, BaseException | None]] = []
        ready = []
        for job in jobs:
            try:
                self._prepare(job)
                ready.append(job)
            except InvalidInput as err:
                answers.append((job, None, err))
            except Exception as err:  # a fault of ours: it still fails this job only
                log.exception("cannot prepare a job")
                answers.append((job, None, LooplineError(f"cannot prepare the input: {err}")))
        described: list[tuple[list[Job], np.ndarray, threading.Event]] = []
        if ready:
            answers.extend(self._run_batch(ready, described))
        try:
            self._deliver(answers)
        finally:  # statistics last: no answer waits for them
            for done, x, event in described:
                _describe(done, x, event)

    def _deliver(self, answers: list[tuple[Job, JobResult | None, BaseException | None]]) -> None:
        """Hand results to their event loops: one wake-up per loop per batch."""
        by_loop: dict[asyncio.AbstractEventLoop, list[Answer]] = {}
        for job, pred, err in answers:
            by_loop.setdefault(job.loop, []).append((job.future, pred, err))
        for loop, items in by_loop.items():
            self._wakers.deliver(loop, items)

    def _run_batch(
        self, jobs: list[Job], described: list[tuple[list[Job], np.ndarray, threading.Event]]
    ) -> list[tuple[Job, JobResult | None, Any]]:
        """Run the model on the jobs; if the batch fails, each job alone, so that one
        job's failure is its own. Appends to ``described`` what ``_describe`` is to fill."""
        try:
            t0 = time.perf_counter()
            preds, x = self._infer(jobs)
            seconds = time.perf_counter() - t0
        except Exception as err:
            if len(jobs) > 1:
                return [answer for job in jobs for answer in self._run_batch([job], described)]
            log.exception("inference failed")
            return [(jobs[0], None, LooplineError(f"inference failed: {err}"))]
        event = threading.Event()
        for job in jobs:
            job.stats = [InputStats(event) for _ in range(job.n)]
        described.append((jobs, x, event))
        if self.on_batch is not None:
            try:
                self.on_batch(jobs, preds, seconds)
            except Exception:  # logging must never cost an answer
                log.exception("prediction hook failed")
        return [(job, pred, None) for job, pred in zip(jobs, preds, strict=True)]

    def _prepare(self, job: Job) -> None:
        """Decode the job's images (one bad image fails the job)."""
        if job.images is not None:
            spec, limit = self.runtime.spec, self.max_pixels
            pixels = [_decode(i, data, spec, limit) for i, data in enumerate(job.images)]
            job.x = to_input(pixels[0][None] if len(pixels) == 1 else np.stack(pixels))
            job.sizes = [len(b) for b in job.images]
        else:
            assert job.tensor is not None
            job.x = job.tensor

    def _infer(self, jobs: list[Job]) -> tuple[list[JobResult], np.ndarray]:
        """Run the model on the jobs' stacked inputs; the results and those inputs."""
        xs = [j.x for j in jobs if j.x is not None]
        x = xs[0] if len(xs) == 1 else np.concatenate(xs)
        step = self.max_batch_size
        if len(x) <= step:
            logits = self.runtime.run(x)
        else:  # one job larger than a batch
            logits = np.concatenate(
                [self.runtime.run(x[i : i + step]) for i in range(0, len(x), step)]
            )
        probs = softmax(logits)
        top = probs.argmax(axis=1)
        conf = probs[np.arange(len(probs)), top]
        hexed = os.urandom(16 * len(x)).hex()  # 128 random bits per prediction id
        out = []
        start = 0
        for job in jobs:
            end = start + job.n
            ids = [hexed[32 * i : 32 * i + 32] for i in range(start, end)]
            out.append(
                JobResult(ids, top[start:end], conf[start:end], probs[start:end], logits[start:end])
            )
            start = end
        return out, x


def _decode(index: int, data: bytes, spec: PreprocessSpec, max_pixels: int | None) -> np.ndarray:
    if not data:
        raise InvalidInput(f"image {index + 1} is empty: send JPEG or PNG bytes")
    try:
        return decode_image(data, spec, max_pixels=max_pixels)
    except InvalidInput as err:  # the same class (and status), naming the image
        raise type(err)(f"image {index + 1}: {err}") from None
    except Exception as err:
        # Only the client's bytes went in, so it is their request that fails (400); the
        # traceback is kept, as the decoder may have a bug worth reporting.
        log.exception("the image decoder failed on image %d", index + 1)
        raise UndecodableImage(
            f"image {index + 1}: cannot decode image ({type(err).__name__}: {err}); "
            "send a valid JPEG or PNG"
        ) from None


def _describe(jobs: list[Job], x: np.ndarray, ready: threading.Event) -> None:
    """Fill each job's ``InputStats`` from one computation over the batch, then set
    ``ready`` (always: a failure leaves the statistics empty, never a row waiting)."""
    try:
        stats = image_stats(x, channels_last=False).astype(np.float64)  # short decimals
        brightness = np.round(stats[:, :2], 3).tolist()
        rgb = np.round(stats[:, 2:5], 2).tolist()
        extra = np.round(stats[:, 5:8], 3).tolist()
        start = 0
        for job in jobs:
            sizes = job.sizes or [None] * job.n
            for i, (row, size) in enumerate(zip(job.stats, sizes, strict=True)):
                b, c = brightness[start + i]
                sharp, sat, dark = extra[start + i]
                row.update(brightness=b, contrast=c, mean_rgb=rgb[start + i])
                row.update(sharpness=sharp, saturation=sat, dark_share=dark)
                if size is not None:
                    row["bytes"] = size
            start += job.n
    except Exception:  # statistics must never cost an answer
        log.exception("cannot compute input statistics")
    finally:
        ready.set()

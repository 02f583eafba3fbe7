"""Tiny real ONNX models for the release tests, built without training (``onnx.helper``).

* ``good_model``: a nearest-colour classifier (global average pool, then one linear layer
  whose rows are the class colours), so the true class of ``colour_image(label)`` is known;
* ``constant_model``: always answers one class;
* ``failing_model``: loads fine and has the right input and output shapes, but every run
  raises in ONNX Runtime (a Gather with an index out of range).

Plus a project whose ``loopline.yaml`` holds small release policies, registration of
bundles with a passed replica test, a real server process serving an environment
(``python -m loopline.deploy.server --env``), and a load of concurrent clients.
"""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tests.deploy.conftest import LABELS, TOKEN, bundle_files, free_port

SIZE = 16
# One colour per class, in LABELS order (car, van, truck, bus, motorcycle).
COLOURS = np.array(
    [[220, 40, 40], [40, 220, 40], [40, 40, 220], [220, 220, 40], [128, 128, 128]],
    dtype=np.float32,
)
TOKEN_VAR = "LOOPLINE_TEST_RELEASE_TOKEN"


# -- models --------------------------------------------------------------------------------
def _model(nodes: list[Any], initializers: list[Any]) -> bytes:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", len(LABELS)])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return bytes(model.SerializeToString())


def _pooled() -> list[Any]:
    from onnx import helper

    return [
        helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["rgb"], axis=1),
    ]


def _linear(weights: np.ndarray, bias: np.ndarray) -> bytes:
    from onnx import helper, numpy_helper

    return _model(
        [
            *_pooled(),
            helper.make_node("MatMul", ["rgb", "w"], ["scores"]),
            helper.make_node("Add", ["scores", "b"], ["logits"]),
        ],
        [
            numpy_helper.from_array(weights.astype(np.float32), "w"),
            numpy_helper.from_array(bias.astype(np.float32), "b"),
        ],
    )


def good_model(scale: float = 0.01) -> bytes:
    """Nearest class colour: argmax of c.x - |c|^2/2 (any ``scale`` gives the same labels)."""
    return _linear(COLOURS.T * scale, -(COLOURS**2).sum(axis=1) / 2 * scale)


def constant_model(label: str = "bus") -> bytes:
    bias = np.zeros(len(LABELS), dtype=np.float32)
    bias[LABELS.index(label)] = 5.0
    return _linear(np.zeros((3, len(LABELS)), dtype=np.float32), bias)


def failing_model() -> bytes:
    from onnx import helper, numpy_helper

    index = np.array([0, 1, 2, 0, 7], dtype=np.int64)  # 7: out of range of the 3 columns
    return _model(
        [*_pooled(), helper.make_node("Gather", ["rgb", "index"], ["logits"], axis=1)],
        [numpy_helper.from_array(index, "index")],
    )


def colour_image(label: str, seed: int) -> bytes:
    """A PNG of ``label``'s colour with a little noise: its true class is ``label``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = COLOURS[LABELS.index(label)] + rng.integers(-15, 16, (24, 24, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def images(n: int, offset: int = 0) -> list[tuple[str, bytes]]:
    """``n`` (true label, PNG) pairs, the classes in turn."""
    return [
        (LABELS[i % len(LABELS)], colour_image(LABELS[i % len(LABELS)], i))
        for i in range(offset, offset + n)
    ]


# -- a project -------------------------------------------------------------------------------
POLICY = (
    "reconcile_interval_s: 0.2, token: '${%s}', capture: {enabled: false},"
    " serve: {workers: %d, flush_interval_s: 0.2, max_queue: 8192},"
    " canary: {share: %s, min_requests: %d, min_labels: 20, max_p95_ms: 60000.0,"
    " max_error_rate: 0.05, max_accuracy_drop: 0.05, auto_promote: %s,"
    " promote_needs_labels: %s}"
)


def env_yaml(
    name: str,
    *,
    workers: int = 1,
    share: float = 0.5,
    min_requests: int = 60,
    auto_promote: bool = True,
    needs_labels: bool = True,
) -> str:
    flags = (str(auto_promote).lower(), str(needs_labels).lower())
    policy = POLICY % (TOKEN_VAR, workers, share, min_requests, *flags)
    return f"  {name}: {{{policy}}}\n"


@dataclass
class ReleaseProject:
    """A project whose registry holds the tiny models, each with a passed replica test."""

    root: Path
    config: Path
    versions: dict[str, int] = field(default_factory=dict)  # kind -> version

    def store(self) -> Any:
        from loopline.config import load_config
        from loopline.drivers.metadata.store import MetadataStore

        return MetadataStore(load_config(self.config).metadata_url())

    def artifacts_url(self) -> str:
        from loopline.config import load_config

        return load_config(self.config).artifacts_url()


MODELS: dict[str, Callable[[], bytes]] = {
    "good": good_model,
    "good2": lambda: good_model(0.02),  # other bytes, same answers
    "constant": constant_model,
    "failing": failing_model,
}


def make_release_project(root: Path, environments: str, metadata_url: str | None = None) -> Any:
    """``root/loopline.yaml`` with ``environments`` and the four models registered."""
    from loopline.bundle import write_bundle
    from loopline.config import load_config
    from loopline.drivers.artifacts.store import ArtifactStore

    root.mkdir(parents=True, exist_ok=True)
    config = root / "loopline.yaml"
    store_line = f"store: {{metadata_url: '{metadata_url}'}}\n" if metadata_url else ""
    config.write_text(
        f"project: vehicles\nmodel: {{name: vehicles}}\n{store_line}environments:\n{environments}"
    )
    project = ReleaseProject(root, config)
    artifacts = ArtifactStore(load_config(config).artifacts_url())
    store = project.store()
    try:
        for kind, build in MODELS.items():
            tar = root / f"{kind}.tar"
            files = bundle_files(build(), size=SIZE)
            files["metadata.json"] = f'{{"name": "vehicles", "kind": "{kind}"}}'.encode()
            write_bundle(files, tar)
            ref = artifacts.put_file(tar)
            mv = store.models.register(
                "vehicles",
                metrics={"accuracy": 0.95},
                bundle_uri=ref.uri,
                bundle_sha256=ref.sha256,
                lineage={"kind": kind},
            ).version
            store.replica_tests.record(
                "vehicles", mv.version, environment="staging", passed=True, reasons=[], report={}
            )
            project.versions[kind] = mv.version
    finally:
        store.close()
    return project


# -- a server serving an environment ---------------------------------------------------------
@dataclass
class EnvServer:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def env_server(project: ReleaseProject, env: str, *args: str) -> Iterator[EnvServer]:
    """``python -m loopline.deploy.server --env ENV`` on a free port, until the test ends."""
    port = free_port()
    log = project.root / f"server-{env}-{port}.log"
    cmd = [sys.executable, "-m", "loopline.deploy.server", "--env", env, "--config",
           str(project.config), "--port", str(port), "--log-level", "info", *args]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, cwd=project.root,
            env={**os.environ, TOKEN_VAR: TOKEN},
        )  # fmt: skip
    server = EnvServer(f"http://127.0.0.1:{port}", proc, log)
    try:
        wait_for(lambda: _live(server), 60, what=f"{env} server alive", alive=proc)
        yield server
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _live(server: EnvServer) -> bool:
    import httpx

    try:
        return httpx.get(server.url + "/v2/health/live", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def ready(server: EnvServer) -> bool:
    import httpx

    try:
        return httpx.get(server.url + "/v2/health/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def wait_for(
    condition: Callable[[], Any],
    timeout: float = 90.0,
    *,
    what: str = "condition",
    alive: subprocess.Popen[bytes] | None = None,
    every: float = 0.1,
) -> Any:
    """Poll ``condition`` until it is truthy (returned); generous, never a timing assertion."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alive is not None and alive.poll() is not None:
            raise AssertionError(f"the server ended (code {alive.returncode}) waiting for {what}")
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


# -- load -----------------------------------------------------------------------------------
@dataclass
class Answer:
    done: float  # time.monotonic() when answered
    status: int
    version: int | None
    label: str | None
    truth: str
    camera: str
    prediction_id: str | None
    error: str | None = None


class Load:
    """``clients`` concurrent clients posting images (with a camera_id) until stopped.

    Runs its own event loop in a thread; ``answers`` grows as they come. With
    ``feedback=True`` the true labels of the answers are posted to /v1/feedback.
    """

    def __init__(
        self,
        url: str,
        *,
        clients: int = 32,
        cameras: int = 16,
        feedback: bool = False,
        pool: int = 60,
    ) -> None:
        self.url = url
        self.clients = clients
        self.cameras = cameras
        self.feedback = feedback
        self.pool = images(pool)
        self.answers: list[Answer] = []
        self.feedback_errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(120)

    def failures(self) -> list[Answer]:
        return [a for a in self.answers if a.status != 200]

    def versions_since(self, t: float) -> list[int | None]:
        return [a.version for a in self.answers if a.done >= t]

    def settled_on(self, version: int, since: float, last: int = 64) -> bool:
        """At least ``last`` answers since ``since``, the latest ``last`` all from ``version``."""
        recent = self.versions_since(since)
        return len(recent) >= last and all(v == version for v in recent[-last:])

    async def _main(self) -> None:
        import httpx

        limits = httpx.Limits(max_connections=self.clients + 2)
        async with httpx.AsyncClient(base_url=self.url, limits=limits, timeout=60) as client:
            tasks = [asyncio.create_task(self._client(client, i)) for i in range(self.clients)]
            if self.feedback:
                tasks.append(asyncio.create_task(self._post_feedback(client)))
            await asyncio.gather(*tasks)

    async def _client(self, client: Any, index: int) -> None:
        n = index
        while not self._stop.is_set():
            truth, png = self.pool[n % len(self.pool)]
            camera = f"cam-{n % self.cameras}"
            n += self.clients
            try:
                r = await client.post(
                    "/v1/models/vehicles/predict",
                    content=png,
                    params={"camera_id": camera},
                    headers={"Content-Type": "image/png"},
                )
            except Exception as err:  # a failed request, whatever the cause
                self.answers.append(
                    Answer(time.monotonic(), 0, None, None, truth, camera, None, repr(err))
                )
                continue
            if r.status_code != 200:
                self.answers.append(
                    Answer(time.monotonic(), r.status_code, None, None, truth, camera, None, r.text)
                )
                continue
            p = r.json()["predictions"][0]
            self.answers.append(
                Answer(time.monotonic(), 200, p["model_version"], p["label"], truth, camera,
                       p["prediction_id"])
            )  # fmt: skip

    async def _post_feedback(self, client: Any) -> None:
        sent = 0
        while not self._stop.is_set():
            await asyncio.sleep(0.3)
            batch = [a for a in self.answers[sent:] if a.status == 200]
            sent = len(self.answers)
            if not batch:
                continue
            items = [{"prediction_id": a.prediction_id, "label": a.truth} for a in batch]
            try:
                r = await client.post(
                    "/v1/feedback", json=items, headers={"Authorization": f"Bearer {TOKEN}"}
                )
            except Exception as err:
                self.feedback_errors.append(repr(err))
                continue
            if r.status_code != 200:
                self.feedback_errors.append(f"{r.status_code} {r.text}")

"""Fixtures for the serving tests: a real bundle of a tiny CNN, registered in a real store,
and real uvicorn servers on free loopback ports (in a thread or a subprocess).

The CNN is exported with torch here, in the tests; the server under test never imports it.
"""

from __future__ import annotations

import io
import json
import shlex
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

LABELS = ["car", "van", "truck", "bus", "motorcycle"]
SIZE = 32
TOKEN = "s3cret-token"


def export_tiny_cnn(path: Path, size: int = SIZE, width: int = 8, depth: int = 2) -> None:
    """Loopline's own CNN, small and untrained, exported as the package step exports it."""
    import torch

    from loopline.builder.trainer import export_onnx
    from loopline.examples.vehicles.cnn import VehicleCNN

    torch.manual_seed(0)
    net = VehicleCNN(num_classes=len(LABELS), input_size=size, depth=depth, width=width).eval()
    export_onnx(net, size, path)


def bundle_files(model: bytes, size: int = SIZE, name: str = "vehicles") -> dict[str, bytes]:
    from loopline.bundle import PreprocessSpec
    from loopline.deploy.image import image_context_files

    files = {
        "model.onnx": model,
        "labels.json": json.dumps(LABELS).encode(),
        "preprocess.json": json.dumps(PreprocessSpec(height=size, width=size).to_dict()).encode(),
        "metadata.json": json.dumps({"name": name, "metrics": {"accuracy": 0.5}}).encode(),
    }
    files.update(image_context_files())
    return files


@pytest.fixture(scope="session")
def model_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    export_tiny_cnn(path)
    return path.read_bytes()


@dataclass
class Project:
    """A project folder whose store holds one registered model, vehicles:1."""

    root: Path
    config: Path
    bundle_tar: Path
    bundle_sha256: str

    def store(self) -> Any:
        from loopline.config import load_config
        from loopline.drivers.metadata.store import MetadataStore

        return MetadataStore(load_config(self.config).metadata_url())


def make_project(root: Path, model: bytes) -> Project:
    from loopline.bundle import write_bundle
    from loopline.config import load_config
    from loopline.drivers.artifacts.store import ArtifactStore
    from loopline.drivers.metadata.store import MetadataStore

    root.mkdir(parents=True, exist_ok=True)
    config = root / "loopline.yaml"
    config.write_text("project: vehicles\nmodel: {name: vehicles}\n")
    cfg = load_config(config)
    tar = root / "bundle.tar"
    sha = write_bundle(bundle_files(model), tar)
    ref = ArtifactStore(cfg.artifacts_url()).put_file(tar)
    store = MetadataStore(cfg.metadata_url())
    store.models.register(
        "vehicles",
        metrics={"accuracy": 0.5},
        bundle_uri=ref.uri,
        bundle_sha256=ref.sha256,
        dataset_version=None,
        run_id=None,
        lineage={},
    )
    store.close()
    return Project(root, config, tar, sha)


@pytest.fixture
def fresh_project(tmp_path: Path, model_bytes: bytes) -> Project:
    return make_project(tmp_path / "project", model_bytes)


@pytest.fixture(scope="module")
def module_project(tmp_path_factory: pytest.TempPathFactory, model_bytes: bytes) -> Project:
    return make_project(tmp_path_factory.mktemp("project"), model_bytes)


# -- images --------------------------------------------------------------------------------
def image_bytes(seed: int, fmt: str = "PNG", size: tuple[int, int] = (48, 40)) -> bytes:
    """A random-ish picture: a coloured background with a block, as PNG or JPEG bytes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = np.empty((size[1], size[0], 3), dtype=np.uint8)
    pixels[:] = rng.integers(0, 256, 3)
    x, y = rng.integers(0, size[0] // 2), rng.integers(0, size[1] // 2)
    pixels[y : y + size[1] // 2, x : x + size[0] // 2] = rng.integers(0, 256, 3)
    pixels = np.clip(pixels + rng.integers(-20, 20, pixels.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def reference_labels(model: bytes, images: list[bytes]) -> list[str]:
    """Top-1 labels from ONNX Runtime in process, on the same decoded pixels."""
    import onnxruntime as ort

    from loopline.bundle import PreprocessSpec, decode_image, to_input

    spec = PreprocessSpec(height=SIZE, width=SIZE)
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    x = to_input(np.stack([decode_image(b, spec) for b in images]))
    (logits,) = session.run(["logits"], {"input": x})
    return [LABELS[i] for i in logits.argmax(axis=1)]


# -- servers -------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, timeout: float = 30.0, alive: Callable[[], bool] | None = None) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise RuntimeError("the server process ended before it was ready")
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"server at {url} not ready after {timeout}s")


@contextmanager
def run_in_thread(app: Any) -> Iterator[str]:
    """Run ``app`` on uvicorn in a thread; yield its base URL; stop it gracefully."""
    import uvicorn

    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", access_log=False, lifespan="on"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, alive=thread.is_alive)
        yield url
    finally:
        server.should_exit = True
        thread.join(30)


@dataclass
class Running:
    url: str
    app: Any
    project: Project

    @property
    def state(self) -> Any:
        return self.app.state.loopline


@contextmanager
def serving(project: Project, **settings: Any) -> Iterator[Running]:
    """Serve vehicles:1 of ``project`` in a thread with the given settings."""
    from loopline.deploy.server import ModelSource, create_app, load_model
    from loopline.deploy.settings import ServeSettings

    options: dict[str, Any] = {"token": TOKEN, "max_body_bytes": 1 << 20, "flush_interval_s": 0.2}
    options.update(settings)
    cfg = ServeSettings(**options)
    served, store = load_model(ModelSource(ref="vehicles:1", config=project.config), cfg)
    app = create_app(served, cfg, store, spill_dir=project.root)
    with run_in_thread(app) as url:
        yield Running(url, app, project)
    if store is not None:
        store.close()


@pytest.fixture(scope="module")
def server(module_project: Project) -> Iterator[Running]:
    """One server per test module, default settings plus a token."""
    with serving(module_project) as running:
        yield running


@dataclass
class Process:
    url: str
    proc: Any
    log: Path

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (graceful) and wait; returns the exit code."""
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return int(self.proc.wait(timeout))


@contextmanager
def server_process(
    project: Project, *args: str, env: dict[str, str] | None = None
) -> Iterator[Process]:
    """``python -m loopline.deploy.server vehicles:1`` in a subprocess (``env`` added)."""
    import os
    import subprocess
    import sys

    port = free_port()
    log = project.root / f"server-{port}.log"
    cmd = [
        sys.executable, "-m", "loopline.deploy.server", "vehicles:1",
        "--config", str(project.config), "--port", str(port), "--log-level", "warning", *args,
    ]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, cwd=project.root,
            env={**os.environ, "LOOPLINE_SERVE_TOKEN": TOKEN, **(env or {})},
        )  # fmt: skip
    running = Process(f"http://127.0.0.1:{port}", proc, log)
    try:
        wait_ready(running.url, timeout=60, alive=lambda: proc.poll() is None)
        yield running
    finally:
        if proc.poll() is None:  # a failed test: stop it (and its workers) anyway
            try:
                running.stop(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def image_command(folder: Path) -> tuple[list[str], dict[str, str]]:
    """The Dockerfile's ENV and CMD, with /bundle standing for ``folder``."""
    text = (folder / "Dockerfile").read_text().replace("\\\n", " ")
    env: dict[str, str] = {}
    cmd: list[str] = []
    for line in text.splitlines():
        if line.startswith("ENV "):
            for pair in shlex.split(line[4:]):
                key, _, value = pair.partition("=")
                env[key] = value
        elif line.startswith("CMD "):
            cmd = json.loads(line[4:])
    assert cmd, "the Dockerfile has no CMD"
    swap = {k: v.replace("/bundle", str(folder)) for k, v in env.items()}
    return [arg.replace("/bundle", str(folder)) for arg in cmd], swap


def image_build_checks(folder: Path) -> list[list[str]]:
    """The Dockerfile's ``RUN python ...`` steps (its checks), with /bundle standing for
    ``folder``."""
    text = (folder / "Dockerfile").read_text().replace("\\\n", " ")
    return [
        [arg.replace("/bundle", str(folder)) for arg in shlex.split(line[4:])]
        for line in text.splitlines()
        if line.startswith("RUN python ")
    ]


@pytest.fixture(scope="session")
def image_python(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A Python that sees the serving dependencies but not the installed Loopline, as in the
    image, where ``import loopline`` finds the bundle's own copy once /bundle is on the path.

    A virtualenv whose one ``.pth`` file names this environment's site-packages: the
    ``.pth`` files inside that folder (the editable install of Loopline among them) are
    not processed, so the packages are found and Loopline is not.
    """
    import os
    import subprocess
    import sysconfig
    import venv

    where = tmp_path_factory.mktemp("image-python")
    venv.create(where, with_pip=False, symlinks=True)
    python = str(where / "bin" / "python")
    ask = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = subprocess.run([python, "-c", ask], capture_output=True, text=True, check=True)
    ours = {sysconfig.get_paths()[key] for key in ("purelib", "platlib")}
    Path(site.stdout.strip(), "serving-deps.pth").write_text("\n".join(sorted(ours)) + "\n")
    probe = "import importlib.util as u; print(u.find_spec('loopline'), u.find_spec('fastapi'))"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "LOOPLINE_"))}
    found = subprocess.run([python, "-I", "-c", probe], capture_output=True, text=True,
                           check=True, env=env).stdout.split(maxsplit=1)  # fmt: skip
    assert found[0] == "None" and found[1] != "None", found
    return python


def predict_with_image_command(
    python: str, folder: Path, env: dict[str, str], home: Path, *extra: str
) -> dict[str, Any]:
    """Run the image's CMD with ``python`` on a free loopback port; predict one image; stop.

    Returns the prediction's JSON body. ``env`` is the process environment (the
    Dockerfile's ENV is added to it).
    """
    import subprocess

    import httpx

    cmd, image_env = image_command(folder)
    assert cmd[0] == "python" and cmd[-4:] == ["--host", "0.0.0.0", "--port", "8080"], cmd
    port = free_port()
    proc = subprocess.Popen(
        [python, *cmd[1:-4], "--host", "127.0.0.1", "--port", str(port), *extra],
        env={**env, **image_env}, cwd=home,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, timeout=120, alive=lambda: proc.poll() is None)
        r = httpx.post(f"{url}/v1/models/vehicles/predict", content=image_bytes(5),
                       headers={"Content-Type": "image/png"})  # fmt: skip
        assert r.status_code == 200, r.text
        return dict(r.json())
    finally:
        proc.terminate()
        proc.wait(60)

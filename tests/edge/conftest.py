"""Fixtures for the edge tests: a project with an edge environment and tiny real bundles,
a real hub (uvicorn on loopback, in a thread, restartable on its port), real agent
subprocesses, and the real Mosquitto broker on 127.0.0.1:1883."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import IN_CI
from tests.deploy.conftest import free_port
from tests.edge.models import tampered_bundle, write_model_bundle

TOKEN = "edge-device-token"
TOKEN_VAR = "LOOPLINE_EDGE_TEST_TOKEN"
MQTT_URL = "mqtt://127.0.0.1:1883"
POLL_S = 0.3
HEARTBEAT_S = 0.5


def mqtt_unreachable() -> str | None:
    """Why the broker cannot be reached, or None when it can."""
    try:
        with socket.create_connection(("127.0.0.1", 1883), timeout=2):
            return None
    except OSError as err:
        return str(err)


@pytest.fixture
def broker() -> str:
    """The Mosquitto broker's URL; skipped (failed in CI) when it is unreachable."""
    why = mqtt_unreachable()
    if why is not None:
        if IN_CI:
            pytest.fail(f"Mosquitto on 127.0.0.1:1883 is required in CI but unreachable: {why}")
        pytest.skip(f"Mosquitto on 127.0.0.1:1883 is unreachable: {why}")
    return MQTT_URL


def wait_for(check: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll ``check`` until it returns something truthy; TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout} s")
        time.sleep(0.05)


@dataclass
class EdgeProject:
    """A project with one edge environment ``env`` and model ``m`` in its registry."""

    root: Path
    config_path: Path
    env: str
    prefix: str
    hub_port: int
    token_file: Path

    def config(self) -> Any:
        from loopline.config import load_config

        return load_config(self.config_path)

    def store(self) -> Any:
        from loopline.drivers.metadata.store import MetadataStore

        return MetadataStore(self.config().metadata_url())

    def register_tar(self, tar: Path) -> int:
        from loopline.drivers.artifacts.store import ArtifactStore

        ref = ArtifactStore(self.config().artifacts_url()).put_file(tar)
        store = self.store()
        try:
            reg = store.models.register("m", metrics={"accuracy": 0.5}, bundle_uri=ref.uri,
                                        bundle_sha256=ref.sha256)  # fmt: skip
        finally:
            store.close()
        assert reg.created, "each test bundle must differ from the ones registered before"
        return int(reg.version.version)

    def register(self, label: str) -> int:
        tar = self.root / f"bundle-{uuid.uuid4().hex[:8]}.tar"
        write_model_bundle(label, tar)
        return self.register_tar(tar)

    def register_tampered(self) -> int:
        tar = self.root / "tampered.tar"
        tampered_bundle(tar)
        return self.register_tar(tar)

    def promote(self, version: int) -> Any:
        from loopline.deploy import release

        store = self.store()
        try:
            return release.promote(store, f"m:{version}", to=self.env,
                                   require_replica_test=False, actor="test")  # fmt: skip
        finally:
            store.close()


def make_edge_project(root: Path, *, db_url: str | None = None, mqtt: bool = True) -> EdgeProject:
    root.mkdir(parents=True, exist_ok=True)
    env = f"edge-{uuid.uuid4().hex[:8]}"
    prefix = f"loopline-test-{uuid.uuid4().hex[:8]}"
    port = free_port()
    edge: dict[str, Any] = {
        "mqtt_url": MQTT_URL if mqtt else None,
        "topic_prefix": prefix,
        "hub_port": port,
        "poll_s": POLL_S,
        "heartbeat_s": HEARTBEAT_S,
    }
    data: dict[str, Any] = {
        "project": "edgetest",
        "model": {"name": "m"},
        "environments": {env: {"target": "edge", "token": "${" + TOKEN_VAR + "}", "edge": edge}},
    }
    if db_url is not None:
        data["store"] = {"metadata_url": db_url}
    config = root / "loopline.yaml"
    config.write_text(yaml.safe_dump(data))
    token_file = root / "device.token"
    token_file.write_text(TOKEN + "\n")
    return EdgeProject(root, config, env, prefix, port, token_file)


@pytest.fixture
def edge_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> EdgeProject:
    monkeypatch.setenv(TOKEN_VAR, TOKEN)
    return make_edge_project(tmp_path / "project")


@dataclass
class HubServer:
    """The hub of ``project.env`` on uvicorn in a thread, on the project's hub port."""

    project: EdgeProject
    hub: Any = None
    _server: Any = None
    _thread: threading.Thread | None = None
    _store: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.project.hub_port}"

    def start(self) -> HubServer:
        import uvicorn

        from loopline.edge.hub import Hub, create_hub_app

        self._store = self.project.store()
        self.hub = Hub(self.project.config(), [self.project.env], self._store,
                       cache_dir=self.project.root / "hub-cache")  # fmt: skip
        config = uvicorn.Config(create_hub_app(self.hub), host="127.0.0.1",
                                port=self.project.hub_port, log_level="warning",
                                access_log=False, lifespan="on")  # fmt: skip
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        wait_for(self._healthy, 30, "the hub's health check")
        return self

    def _healthy(self) -> bool:
        assert self._thread is not None
        if not self._thread.is_alive():
            raise RuntimeError("the hub's thread ended before it was healthy")
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(self.url + "/v1/edge/health", timeout=1).status_code == 200
        return False

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(30)
        if self._store is not None:
            self._store.close()
        self._server = self._thread = self._store = None


@pytest.fixture
def hub_server(edge_project: EdgeProject) -> Iterator[HubServer]:
    server = HubServer(edge_project).start()
    yield server
    server.stop()


@dataclass
class AgentProcess:
    """``python -m loopline.edge.agent`` in a subprocess, with its HTTP endpoint."""

    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    work_dir: Path
    device_id: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def health(self) -> dict[str, Any] | None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"the agent exited ({self.proc.returncode}): {self.log_tail()}")
        try:
            return dict(httpx.get(self.url + "/health", timeout=2).json())
        except (httpx.HTTPError, ValueError):
            return None

    def wait_version(self, version: int, timeout: float = 60.0) -> dict[str, Any]:
        def running() -> dict[str, Any] | None:
            h = self.health()
            return h if h and h.get("version") == version else None

        return dict(wait_for(running, timeout, f"the agent running version {version}"))

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text()[-3000:]
        return ""

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return int(self.proc.wait(timeout))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return int(self.proc.wait())


@dataclass
class AgentFactory:
    project: EdgeProject
    started: list[AgentProcess] = field(default_factory=list)

    def start(self, hub_url: str, *extra: str, device_id: str = "dev-1",
              python_path: Path | None = None) -> AgentProcess:  # fmt: skip
        port = free_port()
        work = self.project.root / f"agent-{device_id}"
        log = self.project.root / f"agent-{device_id}.log"
        cmd = [sys.executable, "-m", "loopline.edge.agent", "--hub", hub_url,
               "--env", self.project.env, "--device-id", device_id,
               "--token-file", str(self.project.token_file), "--work-dir", str(work),
               "--port", str(port), "--poll-s", str(POLL_S), "--heartbeat-s", str(HEARTBEAT_S),
               "--topic-prefix", self.project.prefix, *extra]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPLINE_")}
        if python_path is not None:
            env["PYTHONPATH"] = str(python_path)
        with open(log, "ab") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                    cwd=self.project.root)  # fmt: skip
        agent = AgentProcess(proc, port, log, work, device_id)
        self.started.append(agent)
        return agent


@pytest.fixture
def agents(edge_project: EdgeProject) -> Iterator[AgentFactory]:
    factory = AgentFactory(edge_project)
    yield factory
    for agent in factory.started:
        agent.stop()

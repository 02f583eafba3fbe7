"""The edge target: a self-contained device bundle whose installed agent runs on its own
code and follows the hub, and ``up``/``down``/``status`` of the hub on this machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from loopline.digest import sha256_file
from tests.edge.conftest import (
    TOKEN,
    TOKEN_VAR,
    AgentProcess,
    EdgeProject,
    HubServer,
    make_edge_project,
    wait_for,
)
from tests.edge.models import png

pytestmark = pytest.mark.timeout(300)
ROOT = Path(__file__).resolve().parents[3]
FORBIDDEN = ("torch", "fastapi", "starlette", "uvicorn", "sqlalchemy", "pydantic", "alembic")


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> EdgeProject:
    monkeypatch.setenv(TOKEN_VAR, TOKEN)
    return make_edge_project(tmp_path / "project", mqtt=False)


@pytest.fixture
def rendered(project: EdgeProject, tmp_path: Path) -> tuple[Path, list[Path], int]:
    from loopline.drivers.targets import render

    v1 = project.register("car")
    out = tmp_path / "device-bundle"
    files = render(project.config(), project.env, f"m:{v1}", "edge", out)
    return out, files, v1


def test_render_writes_a_self_contained_verified_device_bundle(
    project: EdgeProject, rendered: tuple[Path, list[Path], int]
) -> None:
    from loopline.drivers.targets.edge import agent_modules

    out, files, v1 = rendered
    names = sorted(p.relative_to(out).as_posix() for p in files)
    assert {"agent.json", "requirements-edge.txt", "loopline-edge-agent.service", "install.sh",
            "README.md", "SHA256SUMS", f"bundle/m-{v1}.tar"} <= set(names)  # fmt: skip
    shipped = sorted(n.removeprefix("agent/loopline/") for n in names if n.startswith("agent/"))
    assert shipped == sorted(agent_modules())
    store = project.store()
    try:
        sha = store.models.get("m", v1).bundle_sha256
    finally:
        store.close()
    assert sha256_file(out / f"bundle/m-{v1}.tar") == sha  # byte for byte the registered one
    config = json.loads((out / "agent.json").read_text())
    assert config["env"] == project.env and config["initial_model"] == {
        "name": "m", "version": v1, "sha256": sha,
    }  # fmt: skip
    assert config["hub_url"] == f"http://127.0.0.1:{project.hub_port}"
    assert (config["poll_s"], config["heartbeat_s"]) == (0.3, 0.5)
    # Pinned exactly as constraints.txt pins them.
    pins = dict(
        line.split("==")
        for line in (ROOT / "constraints.txt").read_text().lower().splitlines()
        if "==" in line
    )
    reqs = [r for r in (out / "requirements-edge.txt").read_text().splitlines() if "==" in r]
    assert sorted(r.split("==")[0] for r in reqs) == ["numpy", "onnxruntime", "paho-mqtt", "pillow"]
    for req in reqs:
        name, version = req.split("==")
        assert pins[name] == version, req
    # Every file is in SHA256SUMS, and the sums hold; no file holds the token.
    listed = {}
    for line in (out / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split("  ", 1)
        listed[name] = digest
    assert sorted(listed) == sorted(set(names) - {"SHA256SUMS"})
    for name, digest in listed.items():
        assert sha256_file(out / name) == digest, name
    for path in out.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    unit = (out / "loopline-edge-agent.service").read_text()
    assert "ExecStart=@PYTHON@ -B -m loopline.edge.agent --config @PREFIX@/agent.json" in unit
    assert "User=loopline-edge" in unit


def test_the_shipped_agent_code_imports_only_what_a_device_has(
    rendered: tuple[Path, list[Path], int],
) -> None:
    out, _, _ = rendered
    probe = (
        "import sys, json; sys.path.insert(0, sys.argv[1]); import loopline; "
        "import loopline.edge.agent, loopline.edge.agent_http, loopline.edge.frames, "
        "loopline.edge.mqtt; print(json.dumps({'file': loopline.__file__, "
        "'modules': sorted(m for m in sys.modules if m.split('.')[0] in "
        + repr(FORBIDDEN + ("loopline",))
        + ")}))"
    )
    result = subprocess.run([sys.executable, "-c", probe, str(out / "agent")],
                            capture_output=True, text=True, check=True)  # fmt: skip
    found = json.loads(result.stdout)
    assert found["file"].startswith(str(out / "agent"))
    assert [m for m in found["modules"] if m.split(".")[0] != "loopline"] == []
    shipped = {"loopline." + m.removesuffix(".py").replace("/", ".").removesuffix(".__init__")
               for m in os.listdir(out / "agent" / "loopline")}  # fmt: skip
    assert "loopline.edge" in {".".join(m.split(".")[:2]) for m in found["modules"]}
    assert shipped  # and every module loaded is a shipped file:
    for module in found["modules"]:
        rel = module.replace(".", "/")
        assert (out / "agent" / f"{rel}.py").is_file() or (
            out / "agent" / rel / "__init__.py"
        ).is_file(), module


@pytest.fixture
def installed(
    project: EdgeProject, rendered: tuple[Path, list[Path], int], tmp_path: Path
) -> tuple[Path, int]:
    out, _, v1 = rendered
    prefix = tmp_path / "opt"
    env = {**os.environ, "LOOPLINE_PREFIX": str(prefix), "LOOPLINE_PYTHON": sys.executable,
           "SKIP_PIP": "1", "SKIP_SYSTEMD": "1", "LOOPLINE_EDGE_TOKEN": TOKEN,
           "LOOPLINE_DEVICE_ID": "pi-7"}  # fmt: skip
    result = subprocess.run(["sh", str(out / "install.sh")], env=env, cwd=tmp_path,
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "installed the Loopline edge agent as device pi-7" in result.stdout
    assert (prefix / "token").read_text().strip() == TOKEN
    assert (prefix / "token").stat().st_mode & 0o077 == 0
    assert json.loads((prefix / "agent.json").read_text())["device_id"] == "pi-7"
    return prefix, v1


def test_install_refuses_an_altered_bundle(
    rendered: tuple[Path, list[Path], int], tmp_path: Path
) -> None:
    out, _, _ = rendered
    (out / "agent" / "loopline" / "edge" / "agent.py").write_text("print('owned')\n")
    env = {**os.environ, "LOOPLINE_PREFIX": str(tmp_path / "opt"), "SKIP_PIP": "1",
           "SKIP_SYSTEMD": "1", "LOOPLINE_EDGE_TOKEN": TOKEN}  # fmt: skip
    result = subprocess.run(
        ["sh", str(out / "install.sh")], env=env, capture_output=True, text=True
    )
    assert result.returncode != 0 and "FAILED" in result.stdout + result.stderr
    assert not (tmp_path / "opt" / "agent").exists()


@pytest.fixture
def installed_agent(project: EdgeProject, installed: tuple[Path, int]) -> Iterator[AgentProcess]:
    """The installed agent, run as its systemd unit would (its own code on PYTHONPATH)."""
    from tests.deploy.conftest import free_port

    prefix, _ = installed
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOOPLINE_", "PYTHON"))}
    env["PYTHONPATH"] = str(prefix / "agent")
    log = prefix / "agent.log"
    cmd = [sys.executable, "-B", "-m", "loopline.edge.agent", "--config",
           str(prefix / "agent.json"), "--port", str(port)]  # fmt: skip
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, env=env, cwd=prefix, stdout=f, stderr=subprocess.STDOUT)
    agent = AgentProcess(proc, port, log, prefix / "work", "pi-7")
    yield agent
    agent.stop()


def test_the_installed_agent_serves_the_shipped_model_offline_then_follows_the_hub(
    project: EdgeProject, installed_agent: AgentProcess
) -> None:
    agent = installed_agent
    v1 = 1
    health = agent.wait_version(v1)  # no hub runs yet: the shipped bundle serves
    assert health["hub_reachable"] is False and health["device_id"] == "pi-7"
    r = httpx.post(agent.url + "/predict", content=png(1), headers={"Content-Type": "image/png"})
    assert r.status_code == 200 and r.json()["model"] == "m:1"
    v2 = project.register("van")
    project.promote(v2)
    hub = HubServer(project).start()
    try:
        agent.wait_version(v2)
        store = project.store()
        try:
            wait_for(lambda: (store.devices.get(project.env, "pi-7") or {}).get("version") == v2,
                     30, "the device reporting version 2")  # fmt: skip
            ids = {r.json()["id"]}
            wait_for(lambda: {p.id for p in store.predictions.find(model_name="m")} >= ids,
                     30, "the offline prediction uploaded")  # fmt: skip
        finally:
            store.close()
    finally:
        hub.stop()


def test_up_starts_the_hub_status_shows_it_and_down_stops_it(project: EdgeProject) -> None:
    from loopline.drivers.targets import TargetContext, get_target

    target = get_target("edge")
    cfg = project.config()
    ctx = TargetContext(config=cfg, environment=project.env, env=cfg.environment(project.env),
                        extra={"config_path": project.config_path, "wait_s": 60})  # fmt: skip
    try:
        outcome = target.up(ctx)
        assert outcome.ok, outcome.message + json.dumps(outcome.details.get("log_tail"))
        hub_url = f"http://127.0.0.1:{project.hub_port}"
        assert outcome.details["hub_url"] == hub_url
        r = httpx.get(hub_url + "/v1/edge/health")
        assert r.status_code == 200 and r.json()["environments"] == [project.env]
        r = httpx.get(f"{hub_url}/v1/edge/{project.env}/deployment",
                      headers={"Authorization": f"Bearer {TOKEN}"})  # fmt: skip
        assert r.status_code == 200
        status: dict[str, Any] = target.status(ctx)
        assert status["running"] and status["healthy"] and status["devices"] == []
    finally:
        down = target.down(ctx)
    assert down.ok, down.message
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{project.hub_port}/v1/edge/health", timeout=2)
    assert target.status(ctx)["running"] is False

"""``loopline up`` / ``loopline down``: a real supervised server in the background, one-line
errors, the log's tail when a start fails, and JSON for scripts.

The local target's server command is swapped for the server's ``MODEL`` form (a registered
tiny model), since these tests are about the commands, not the server's ``--env`` flag.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from loopline.cli.main import app
from loopline.drivers.targets import TARGETS
from loopline.drivers.targets.local import LocalTarget
from loopline.drivers.targets.supervisor import SupervisorPolicy
from tests.deploy.conftest import Project, free_port, image_bytes, make_project, model_bytes
from tests.drivers.targets.test_local import ModelTarget, alive, session_members, write_config

__all__ = ["model_bytes"]

runner = CliRunner()
FAST = SupervisorPolicy(backoff_base_s=0.2, health_interval_s=0.2, stop_timeout_s=20)


def invoke(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def error_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture
def cli_project(tmp_path: Path, model_bytes: bytes) -> Project:
    p = make_project(tmp_path / "project", model_bytes)
    write_config(p, free_port())
    return p


class GoodModel(ModelTarget):
    """The local target serving vehicles:1 through the server's MODEL form, restarting fast."""

    def __init__(self) -> None:
        super().__init__("vehicles:1", policy=FAST)


class MissingModel(ModelTarget):
    def __init__(self) -> None:
        super().__init__("vehicles:42", policy=FAST)


def serve_model(monkeypatch: pytest.MonkeyPatch, target: type[LocalTarget]) -> None:
    """Make ``loopline up`` pick ``target`` for the local target (by its dotted path)."""
    monkeypatch.setitem(TARGETS, "local", f"{__name__}:{target.__name__}")


@pytest.fixture
def down_after(cli_project: Project) -> Any:
    yield
    invoke("down", "--env", "staging", "--config", str(cli_project.config))


def test_up_json_then_down(
    cli_project: Project, monkeypatch: pytest.MonkeyPatch, down_after: Any
) -> None:
    serve_model(monkeypatch, GoodModel)
    cfg = str(cli_project.config)
    code, out, err = invoke("up", "--env", "staging", "--config", cfg, "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["ok"] is True and data["details"]["endpoint"] in data["message"]
    assert data["details"]["ready"] is True  # the MODEL form serves vehicles:1 at once
    url = data["details"]["endpoint"]
    assert httpx.get(f"{url}/v2/health/ready", timeout=5).status_code == 200
    supervisor, server = data["details"]["supervisor_pid"], data["details"]["server_pid"]

    code, out, _ = invoke("up", "--env", "staging", "--config", cfg)
    assert code == 0 and "already running" in out and url in out

    code, out, err = invoke("down", "--env", "staging", "--config", cfg)
    assert code == 0, err
    assert "stopped environment staging" in out
    assert not alive(supervisor) and not alive(server) and session_members(supervisor) == []

    code, out, _ = invoke("down", "--env", "staging", "--config", cfg)
    assert code == 0 and "nothing runs for environment staging" in out


def test_up_on_an_environment_with_nothing_deployed_waits_then_a_promote_serves(
    tmp_path: Path, model_bytes: bytes
) -> None:
    """``loopline up --env production`` on a fresh project (the real ``--env`` server):
    alive, waiting for a deployment, exit 0; ``loopline promote`` then makes the same
    server process serve, without a restart."""
    project = make_project(tmp_path / "p", model_bytes)
    port = free_port()
    project.config.write_text(
        project.config.read_text()
        + f"environments:\n  production: {{port: {port}, serve: {{workers: 1}}}}\n"
    )
    cfg, url = str(project.config), f"http://127.0.0.1:{port}"
    try:
        code, out, err = invoke("up", "--env", "production", "--config", cfg, "--json")
        assert code == 0, (out, err)
        data = json.loads(out)
        assert data["ok"] is True and data["details"]["ready"] is False
        assert (f"running at {url}, waiting for a deployment (loopline promote NAME:VERSION "
                "--to production)") in data["message"]  # fmt: skip
        assert httpx.get(f"{url}/v2/health/live", timeout=5).status_code == 200
        assert httpx.get(f"{url}/v2/health/ready", timeout=5).status_code == 503
        server = data["details"]["server_pid"]

        store = project.store()  # the replica test a promotion to production needs
        store.replica_tests.record("vehicles", 1, environment="staging", passed=True,
                                   reasons=[], report={}, actor="test")  # fmt: skip
        store.close()
        code, out, err = invoke("promote", "vehicles:1", "--to", "production", "--config", cfg)
        assert code == 0, (out, err)
        deadline = time.monotonic() + 60
        while httpx.get(f"{url}/v2/health/ready", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, "production never served vehicles:1"
            time.sleep(0.2)
        r = httpx.post(f"{url}/v1/models/vehicles/predict", content=image_bytes(1),
                       headers={"Content-Type": "image/png"}, timeout=30)  # fmt: skip
        assert r.status_code == 200 and r.json()["model_version"] == 1, r.text

        code, out, _ = invoke("up", "--env", "production", "--config", cfg, "--json")
        again = json.loads(out)
        assert code == 0 and "already running" in again["message"]
        assert f"healthy at {url}, serving vehicles:1" in again["message"]
        assert again["details"]["server_pid"] == server and again["details"]["restarts"] == 0
    finally:
        invoke("down", "--env", "production", "--config", cfg)


def test_a_failing_start_prints_the_log_tail_and_exits_1(
    cli_project: Project, monkeypatch: pytest.MonkeyPatch, down_after: Any
) -> None:
    serve_model(monkeypatch, MissingModel)
    code, out, err = invoke("up", "--env", "staging", "--config", str(cli_project.config))
    assert code == 1
    line = error_line(err)
    assert "environment staging is not serving" in line and "loopline down" in line
    assert "server.log:" in err  # the header of the tail
    tail = err.split("server.log:", 1)[1]
    assert "error:" in tail and "42" in tail, err
    assert err.strip().splitlines()[-1] == line  # the error line comes last


def test_an_unknown_environment_is_one_line(cli_project: Project) -> None:
    code, _, err = invoke("up", "--env", "nope", "--config", str(cli_project.config))
    assert code == 1
    line = error_line(err)
    assert "no environment 'nope'" in line and "staging" in line and "production" in line
    assert len(err.strip().splitlines()) == 1


def test_a_target_whose_module_is_missing_is_one_line(
    cli_project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    cli_project.config.write_text(
        "project: vehicles\nenvironments:\n  edge-a1: {target: edge, port: 8099}\n"
    )
    monkeypatch.setitem(TARGETS, "edge", "loopline.drivers.targets.no_such_module:EdgeTarget")
    for command in ("up", "down"):
        code, _, err = invoke(command, "--env", "edge-a1", "--config", str(cli_project.config))
        assert code == 1
        line = error_line(err)
        assert "environment edge-a1: the edge target is not available" in line
        assert "loopline.drivers.targets.no_such_module" in line


def test_up_outside_a_project_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LOOPLINE_DB_URL", raising=False)
    code, _, err = invoke("up", "--env", "staging")
    assert code == 1 and "no Loopline project here" in error_line(err)
    assert not (tmp_path / ".loopline").exists()


def test_up_on_a_bundle_target_uses_the_deployed_version_or_says_there_is_none(
    tmp_path: Path, model_bytes: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A container environment is handed the deployed version's bundle; with no engine
    (PATH holds none here) it says so and prints the exact commands, naming that version."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    project = make_project(tmp_path / "p", model_bytes)
    project.config.write_text(
        project.config.read_text() + "environments:\n  box: {target: container}\n"
    )
    code, _, err = invoke("up", "--env", "box", "-c", str(project.config))
    assert code == 1 and "box has no deployed version yet" in error_line(err)
    store = project.store()
    store.deployments.change("box", expected_generation=0, action="promote", actor="t",
                             model_name="vehicles", stable_version=1)  # fmt: skip
    store.close()
    code, out, err = invoke("up", "--env", "box", "-c", str(project.config), "--json")
    result = json.loads(out)
    assert code == 1 and not result["ok"], err
    assert "no container engine was found" in result["message"]
    assert any("vehicles:1" in c or "vehicles-1" in c for c in result["commands"]), result

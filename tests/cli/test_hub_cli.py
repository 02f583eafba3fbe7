"""``loopline hub``: serves an edge environment until SIGTERM; mistakes are one line, exit 1."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from loopline.cli.main import app
from tests.edge.conftest import TOKEN, TOKEN_VAR, make_edge_project, wait_for


def one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error:"), stderr
    return lines[0]


def test_mistakes_are_one_line_and_exit_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project = make_edge_project(tmp_path / "p", mqtt=False)
    monkeypatch.delenv(TOKEN_VAR, raising=False)
    runner = CliRunner()
    result = runner.invoke(app, ["hub", "--env", "nope", "--config", str(project.config_path)])
    assert result.exit_code == 1
    assert "no environment 'nope'" in one_line_error(result.stderr)
    result = runner.invoke(app, ["hub", "--env", project.env, "-c", str(project.config_path)])
    assert result.exit_code == 1
    assert TOKEN_VAR in one_line_error(result.stderr)


def test_the_command_serves_until_sigterm(tmp_path: Path) -> None:
    project = make_edge_project(tmp_path / "p", mqtt=False)
    exe = shutil.which("loopline", path=str(Path(sys.executable).parent))
    assert exe is not None
    env = {**os.environ, TOKEN_VAR: TOKEN}
    proc = subprocess.Popen([exe, "hub", "--env", project.env, "-c", str(project.config_path),
                             "--log-level", "warning"], env=env)  # fmt: skip
    url = f"http://127.0.0.1:{project.hub_port}"
    try:

        def healthy() -> bool:
            assert proc.poll() is None, "the hub exited"
            try:
                return httpx.get(url + "/v1/edge/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, 60, "the hub answering")
        r = httpx.get(f"{url}/v1/edge/{project.env}/deployment",
                      headers={"Authorization": f"Bearer {TOKEN}"})  # fmt: skip
        assert r.status_code == 200 and r.json()["version"] is None
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) in (0, -15)  # uvicorn re-raises SIGTERM after a clean stop

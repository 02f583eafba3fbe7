"""``loopline serve``: help, a clear one-line error, and a real start and graceful stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx
import typer
from typer.testing import CliRunner

from loopline.cli.serve import register
from tests.deploy.conftest import TOKEN, Project, free_port, wait_ready

APP = """
import typer
from loopline.cli.serve import register
app = typer.Typer()
@app.callback()
def main() -> None: ...
register(app)
app()
"""


def cli() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def main() -> None: ...

    register(app)
    return app


def test_help_explains() -> None:
    result = CliRunner().invoke(cli(), ["serve", "--help"])
    assert result.exit_code == 0
    for words in ("NAME@ALIAS", "--max-batch-size", "--workers", "LOOPLINE_SERVE_TOKEN", "/v2"):
        assert words in result.output


def test_errors_are_one_line(fresh_project: Project) -> None:
    result = CliRunner().invoke(
        cli(), ["serve", "vehicles:9", "--config", str(fresh_project.config)]
    )
    assert result.exit_code == 1
    assert result.stderr == "error: no model version vehicles:9 (see `loopline models`)\n"
    result = CliRunner().invoke(cli(), ["serve", "vehicles", "--port", "99999"])
    assert result.exit_code == 1 and result.stderr.startswith("error: serve setting port")


def test_serve_starts_and_stops(fresh_project: Project) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", APP, "serve", "vehicles@candidate", "--config",
         str(fresh_project.config), "--port", str(port), "--max-batch-size", "8"],
        env={**os.environ, "LOOPLINE_SERVE_TOKEN": TOKEN}, cwd=fresh_project.root,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, timeout=60, alive=lambda: proc.poll() is None)
        assert httpx.get(f"{url}/v2/models/vehicles").json()["versions"] == ["1"]
        config = httpx.get(f"{url}/v2/models/vehicles/config").json()
        assert config["dynamic_batching"]["preferred_batch_size"] == [8]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

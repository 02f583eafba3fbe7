"""``loopline serve``: help, a clear one-line error, and a real start and graceful stop."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import typer
from typer.testing import CliRunner

from loopline.cli.serve import register
from loopline.deploy.settings import ServeSettings
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


def listed_flags(help_text: str) -> set[str]:
    """The flags a --help lists (its option lines, which start with a dash)."""
    lines = [line for line in help_text.splitlines() if line.lstrip().startswith("-")]
    return {f for line in lines for f in re.findall(r"--[a-z][a-z0-9-]*", line)}


def test_both_commands_take_the_same_flags() -> None:
    cli_help = CliRunner().invoke(cli(), ["serve", "--help"])
    assert cli_help.exit_code == 0, cli_help.output
    module_help = subprocess.run(
        [sys.executable, "-m", "loopline.deploy.server", "--help"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert listed_flags(cli_help.output) == listed_flags(module_help)
    # One flag per setting (the tokens stay off the command line: see --token-file).
    names = {"log_predictions": "log"}
    secrets = ("token", "capture_read_token")
    settings = {
        "--" + names.get(field, field).replace("_", "-")
        for field in ServeSettings.model_fields
        if field not in secrets
    }
    assert settings <= listed_flags(module_help)
    assert not {"--token", "--capture-read-token"} & listed_flags(module_help)
    assert {"--bundle", "--config", "--token-file", "--no-log", "--max-image-pixels"} <= (
        listed_flags(module_help)
    )


def test_errors_are_one_line(fresh_project: Project) -> None:
    result = CliRunner().invoke(
        cli(), ["serve", "vehicles:9", "--config", str(fresh_project.config)]
    )
    assert result.exit_code == 1
    assert result.stderr == "error: no model version vehicles:9 (see `loopline models`)\n"
    result = CliRunner().invoke(cli(), ["serve", "vehicles", "--port", "99999"])
    assert result.exit_code == 1 and result.stderr.startswith("error: serve setting port")


def _server_module(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPLINE_")}
    return subprocess.run(
        [sys.executable, "-m", "loopline.deploy.server", *args],
        capture_output=True, text=True, timeout=120, cwd=folder, env=env,
    )  # fmt: skip


def test_the_server_module_outside_a_project_says_so_and_creates_nothing(
    tmp_path: Path,
) -> None:
    out = _server_module(tmp_path, "vehicles:1")
    assert out.returncode == 1
    assert out.stderr == (
        f"error: no Loopline project here: {tmp_path} has no loopline.yaml; create one with "
        "`loopline init`, or pass --config FILE (or set LOOPLINE_DB_URL)\n"
    )
    assert list(tmp_path.iterdir()) == []


def test_a_first_open_of_the_store_prints_no_migration_lines(tmp_path: Path) -> None:
    (tmp_path / "loopline.yaml").write_text("project: p\n")
    out = _server_module(tmp_path, "vehicles:1")
    assert out.returncode == 1
    assert out.stderr == "error: no model version vehicles:1 (see `loopline models`)\n"
    assert (tmp_path / ".loopline" / "loopline.db").is_file()  # the store was created


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

"""The ``loopline`` command: thin Typer commands over the library API.

Heavy modules (torch, the build steps, the server) are imported inside the commands that
need them, so ``loopline --help`` stays fast.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from loopline import __version__
from loopline.cli import build, evaluate, models, project, records, runs
from loopline.cli import capture as capture_commands
from loopline.cli import demo as demo_command
from loopline.cli import deploy as deploy_command
from loopline.cli import envs as env_commands
from loopline.cli import hub as hub_command
from loopline.cli import metrics as metrics_commands
from loopline.cli import monitor as monitor_commands
from loopline.cli import predict as predict_command
from loopline.cli import release as release_commands
from loopline.cli import render as render_command
from loopline.cli import serve as serve_command
from loopline.cli.output import console, print_error
from loopline.errors import LooplineError

app = typer.Typer(
    name="loopline",
    help="Closed-loop MLOps: build, deploy and monitor models as one loop.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(runs.app, name="runs")
app.add_typer(models.app, name="models")
app.add_typer(capture_commands.app, name="capture")
app.command()(project.init)
app.command()(project.datagen)
app.command()(build.build)
app.command()(predict_command.predict)
app.command()(records.datasets)
app.command()(records.audit)
app.command("evaluate")(evaluate.evaluate_cmd)
app.command("render")(render_command.render)
serve_command.register(app)
release_commands.register(app)
deploy_command.register(app)
env_commands.register(app)
hub_command.register(app)
monitor_commands.register(app)
metrics_commands.register(app)
demo_command.register(app)


def _version(value: bool) -> None:
    if value:
        console.print(f"loopline {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show version.")
    ] = False,
) -> None:
    """Loopline: ingest, validate, train, evaluate, gate, package and register models."""


def run() -> None:
    """Console-script entry point."""
    try:
        app()
    except LooplineError as err:  # pragma: no cover - commands map their own errors
        print_error(err)
        sys.exit(err.exit_code)


if __name__ == "__main__":
    run()

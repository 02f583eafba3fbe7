"""``loopline demo``: the whole closed loop on the example, unattended, in a few minutes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from loopline.cli.common import JsonOpt, fail
from loopline.cli.output import console, err_console, print_json
from loopline.errors import LooplineError


def demo(
    directory: Annotated[
        Path,
        typer.Option(
            "--dir", help="Folder the demo works in (made, or reset if a previous demo's)."
        ),
    ] = Path("loopline-demo"),
    fast: Annotated[
        bool, typer.Option("--fast", help="A reduced scenario (smaller lake, fewer labels).")
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed of the lake, the traffic and training.")] = 0,
    json_out: JsonOpt = False,
) -> None:
    """The whole closed loop, unattended, on simulated CCTV traffic (about 2 minutes).

    Builds v1 on day images and serves it; fog and night set in; the monitor's loop
    retrains and redeploys. Prints a live timeline, writes report.html and timeline.json.

    Exit 0 when accuracy recovered to within 10 points of its level before the drift, 1
    otherwise (the report says why).
    """
    from loopline.demo.scenario import Scenario
    from loopline.demo.story import run_demo

    scenario = (Scenario.fast() if fast else Scenario()).with_(seed=seed)
    shown = err_console if json_out else console
    try:
        doc = run_demo(directory, scenario, shown)
    except LooplineError as err:
        fail(err)
    if json_out:
        print_json(doc)
    else:
        _print_summary(doc)
    if not doc["ok"]:
        raise typer.Exit(1)


def _print_summary(doc: dict[str, object]) -> None:
    from loopline.demo.report import headline

    console.print()
    console.print(escape(headline(doc)), highlight=False, soft_wrap=True)
    if not doc["ok"]:
        console.print(f"[red]not finished:[/red] {escape(str(doc.get('reason') or 'no recovery'))}")
    console.print(escape(f"report: {doc['report']}"), highlight=False, soft_wrap=True)
    console.print(
        escape(f"then: cd {doc['dir']} && loopline alerts --all && loopline models"),
        highlight=False,
        soft_wrap=True,
    )


def register(app: typer.Typer) -> None:
    """Add ``demo`` to the ``loopline`` CLI."""
    app.command()(demo)

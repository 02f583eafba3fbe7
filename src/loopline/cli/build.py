"""``loopline build``: run the Build pipeline."""

from __future__ import annotations

import os
from typing import Annotated

import typer
from rich.markup import escape

from loopline.cli.common import ConfigOpt, JsonOpt, fail, load_config
from loopline.cli.output import console, print_json
from loopline.errors import LooplineError


def build(
    config: ConfigOpt = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config key, e.g. --set train.epochs=1."),
    ] = None,
    resume: Annotated[
        str | None, typer.Option(help="Continue a failed or interrupted run from its failed step.")
    ] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Run every step.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Run the Build pipeline: ingest, validate, split, train, evaluate, gate, package, register.

    Exit codes: 0 a model was registered (or the bundle equals a registered version, which
    is then named and nothing is registered), 3 the gate rejected it, 1 an error.
    """
    from loopline.builder import build as run_build
    from loopline.cli.output import RichReporter

    try:
        if resume and set_:
            raise LooplineError(
                "--set cannot be combined with --resume: a resumed run keeps the configuration "
                "it was started with (start a new build to change it)"
            )
        cfg = load_config(config, set_)
        with RichReporter(quiet=json_out) as reporter:
            result = run_build(
                cfg,
                resume=resume,
                reporter=reporter,
                use_cache=not no_cache,
                actor=os.environ.get("USER", "cli"),
            )
    except LooplineError as err:
        fail(err)
    if json_out:
        print_json(
            {
                "run_id": result.run_id,
                "status": result.status,
                "model": result.model,
                "reason": result.reason,
                "steps": result.steps,
                "registered": result.registered,
                "equals": (
                    f"{result.equals['name']}:{result.equals['version']}" if result.equals else None
                ),
            }
        )
    elif result.status == "succeeded" and result.model:
        m = result.model
        met = m["metrics"]
        verb = (
            "[green]registered[/green]"
            if result.registered
            else "nothing registered, the bundle equals"
        )
        console.print(
            f"{verb} {escape(m['name'])}:{m['version']} (run {result.run_id}) "
            f"accuracy {met['accuracy']:.3f} macro-F1 {met['macro_f1']:.3f}"
        )
    else:
        console.print(f"[yellow]{escape(result.reason or '')}[/yellow] (run {result.run_id})")
    if result.status == "rejected":
        raise typer.Exit(3)

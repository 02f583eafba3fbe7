"""``loopline runs``: list pipeline runs, or show one with its steps and trials."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.markup import escape

from loopline.cli.common import ConfigOpt, JsonOpt, fail, open_store, when
from loopline.cli.output import cell, console, print_json
from loopline.errors import LooplineError

app = typer.Typer(help="Pipeline runs: list them, or show one with its steps and trials.")


@app.callback(invoke_without_command=True)
def runs_list(
    ctx: typer.Context,
    config: ConfigOpt = None,
    limit: Annotated[int, typer.Option(help="How many, newest first.")] = 20,
    json_out: JsonOpt = False,
) -> None:
    """List pipeline runs, newest first."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.table import Table

    try:
        runs = open_store(config).runs.recent(limit)
    except LooplineError as err:
        fail(err)
    if json_out:
        print_json([_run_dict(r) for r in runs])
        return
    table = Table()
    # The id is what `runs show` and `build --resume` take: whole, on one line, at any
    # width; the other columns wrap or shorten instead.
    width = max((len(r.id) for r in runs), default=3)
    table.add_column("run", no_wrap=True, min_width=width)
    for name in ("status", "trigger", "dataset", "model", "started"):
        table.add_column(name)
    table.add_column("error", overflow="fold")
    for r in runs:
        model = f"{r.model_name}:{r.model_version}" if r.model_version else ""
        error = (r.error or "").strip().splitlines()
        table.add_row(
            cell(r.id),
            cell(r.status),
            cell(r.trigger),
            cell((r.dataset_version or "")[:12]),
            cell(model),
            cell(when(r.started_at)),
            cell(error[-1][:60] if error else ""),
        )
    console.print(table)


def _run_dict(r: Any) -> dict[str, Any]:
    d = r.to_dict()
    d.pop("config", None)
    return d


@app.command("show")
def runs_show(
    run_id: Annotated[str, typer.Argument(help="Run id (a unique prefix is enough).")],
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Show one run: its steps (ran or cached, timings, digests), HPO trials and step logs
    (validation counts per reason, metrics per segment, the gate's decision)."""
    from rich.table import Table

    try:
        store = open_store(config)
        run = store.runs.get(run_id)
        steps = store.steps.for_run(run.id)
        trials = store.trials.for_run(run.id)
    except LooplineError as err:
        fail(err)
    if json_out:
        data = run.to_dict()
        data["steps"] = [s.to_dict() for s in steps]
        data["trials"] = [t.to_dict() for t in trials]
        print_json(data)
        return
    console.print(
        f"run [bold]{escape(run.id)}[/bold] {run.status} ({escape(run.trigger)}) "
        f"dataset {(run.dataset_version or '-')[:12]} "
        f"model {escape(run.model_name or '-')}:{run.model_version or '-'}"
    )
    if run.error:
        console.print(f"[red]{escape(run.error)}[/red]", highlight=False)
    table = Table("step", "status", "cached", "seconds", "outputs")
    for s in steps:
        outs = ", ".join(f"{k}={v['sha256'][:10]}" for k, v in (s.outputs or {}).items())
        cached = f"from {s.cached_from}" if s.cached else ""
        table.add_row(
            cell(s.step), cell(s.status), cell(cached), f"{s.duration_s or 0:.2f}", cell(outs)
        )
    console.print(table)
    if trials:
        t = Table("trial", "state", "params", "val macro-F1", "epochs", "seconds")
        for tr in trials:
            t.add_row(
                str(tr.number),
                cell(tr.state),
                cell(tr.params),
                f"{tr.value:.4f}" if tr.value is not None else "-",
                str(tr.epochs),
                f"{tr.duration_s or 0:.1f}",
            )
        console.print(t)
    for s in steps:
        if s.log and not s.cached:
            for line in s.log.splitlines():
                console.print(f"  [dim]{escape(s.step)}:[/dim] {escape(line)}", highlight=False)
        if s.error and s.status == "failed":
            last = s.error.strip().splitlines()[-1]
            console.print(f"  [red]{escape(s.step)}: {escape(last)}[/red]", highlight=False)

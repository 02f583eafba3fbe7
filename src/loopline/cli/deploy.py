"""``loopline deploy``: stage a candidate in a pre-production replica and run its replica
test, a thin shell over ``loopline.deploy.preprod.deploy``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from loopline.cli.common import ConfigOpt, JsonOpt, fail, load_config, open_store
from loopline.cli.output import RichReporter, cell, console, escape, print_json
from loopline.errors import LooplineError

if TYPE_CHECKING:
    from loopline.deploy.replica import ReplicaTestReport

_MARKS = {"passed": "[green]✔[/green]", "failed": "[red]✘[/red]", "skipped": "[yellow]–[/yellow]"}


class PhaseReporter(RichReporter):
    """One line per replica-test phase (passed, failed, skipped), with progress bars."""

    def step_finished(self, step: str, status: str, seconds: float, note: str = "") -> None:
        if self.quiet:
            return
        mark = _MARKS.get(status, "•")
        extra = f" [dim]{escape(note)}[/dim]" if note else ""
        self.out.print(f"{mark} {step:<7} {status} in {seconds:.1f}s{extra}", highlight=False)


def _value(v: Any, unit: str) -> str:
    if v is None:
        return "n/a"
    text = f"{v:.4g}" if isinstance(v, float) else str(v)
    return f"{text} {unit}".strip()


def print_report(report: ReplicaTestReport, record_id: str, path: Path) -> None:
    from rich.table import Table

    table = Table("phase", "check", "value", "limit", "result")
    for phase in report.phases:
        if phase.status == "skipped":
            table.add_row(cell(phase.name), cell("(skipped)"), cell(phase.reason), "", "skip")
        for c in phase.checks:
            mark = "[green]pass[/green]" if c.passed else "[red]fail[/red]"
            table.add_row(cell(phase.name), cell(c.name), cell(_value(c.value, c.unit)),
                          cell(f"{c.op} {_value(c.limit, c.unit)}"), mark)  # fmt: skip
    console.print(table)
    ref = f"{report.model}:{report.version}"
    if report.passed:
        console.print(
            f"[green]passed[/green] {escape(ref)} in {escape(report.environment)} "
            f"(replica test {record_id[:12]}); it may be promoted: loopline promote "
            f"{escape(ref)} --to production"
        )
    else:
        console.print(
            f"[red]failed[/red] {escape(ref)} (replica test {record_id[:12]}): "
            + escape("; ".join(report.reasons))
        )
    console.print(f"[dim]report: {escape(str(path))}[/dim]")


def deploy(
    ref: Annotated[str, typer.Argument(help="NAME:VERSION (or NAME@ALIAS) to test.")],
    env: Annotated[
        str, typer.Option("--env", help="Pre-production environment to stage it in.")
    ] = "staging",
    report_file: Annotated[
        Path | None, typer.Option("--report", help="Also write the JSON report to this file.")
    ] = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Test a candidate in a replica of production (the replica test).

    Phases: the test split in bulk, replayed production requests, a load phase and a
    memory check, each against the environment's replica_test limits.

    Exit codes: 0 passed (it may be promoted), 3 failed (the reasons are shown), 1 error.
    """
    from loopline.config import DEFAULT_CONFIG_FILE
    from loopline.deploy.preprod import deploy as run_deploy

    try:
        cfg = load_config(config, project=True)
        store = open_store(config)
        with PhaseReporter(quiet=json_out) as reporter:
            result = run_deploy(
                cfg, store, ref, env=env, reporter=reporter,
                config_path=config or Path(DEFAULT_CONFIG_FILE),
            )  # fmt: skip
        data = {"id": result.record.id, **result.record.report, "path": str(result.path)}
        if report_file is not None:
            try:
                report_file.write_text(json.dumps(data, indent=2, default=str) + "\n")
            except OSError as err:
                raise LooplineError(f"cannot write --report {report_file}: {err}") from None
    except LooplineError as err:
        fail(err)
    if json_out:
        print_json(data)
    else:
        print_report(result.report, result.record.id, result.path)
    if not result.passed:
        raise typer.Exit(3)


def register(app: typer.Typer) -> None:
    app.command()(deploy)

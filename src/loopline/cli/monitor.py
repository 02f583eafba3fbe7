"""``loopline monitor``: a thin shell over ``loopline.monitor.service.run``, which
evaluates the rules every interval and runs the actions; it prints each pass (one JSON
line with ``--json``). ``register`` also adds ``alerts``, ``approve`` and ``reject``
(``loopline.cli.alerts``).
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Annotated, Any

import typer

from loopline.cli.common import ConfigOpt, fail, load_config, open_store
from loopline.cli.durations import parse_duration
from loopline.cli.output import console, err_console, escape, print_error
from loopline.errors import LooplineError

if TYPE_CHECKING:
    from loopline.monitor.passes import PassReport


def parse_interval(text: str) -> float:
    """``--interval``: ``5s``, ``500ms``, ``2m``, ``1h30m``, ... as seconds (> 0)."""
    return parse_duration(text, "--interval")


def _num(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


# -- loopline monitor ---------------------------------------------------------------------
def monitor(
    once: Annotated[
        bool, typer.Option("--once", help="One pass (and the loops' steps), then exit.")
    ] = False,
    interval: Annotated[
        str | None,
        typer.Option(
            "--interval", help="Time between passes, e.g. 5s (default monitor.interval_s)."
        ),
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            "--metrics-port",
            min=0,
            max=65535,
            help="Serve the rules' current values for Prometheus at :PORT/metrics.",
        ),
    ] = None,
    config: ConfigOpt = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="One JSON object per pass, one line each.")
    ] = False,
) -> None:
    """Watch the deployed versions: evaluate the alert rules and run their actions.

    Each pass reads the predictions and labels that arrived since the last one, measures
    every rule per version and segment, moves the alerts (pending, firing, resolved),
    notifies the channels and starts a loop for each alert that fires with an action.
    Loops (retrain, approval, canary) advance beside the passes. Ctrl-C or SIGTERM stops
    after the pass under way; a loop in the middle of a step resumes at the next start.
    """
    from loopline.cli.output import RichReporter
    from loopline.monitor import service

    try:
        cfg = load_config(config, project=True)
        seconds = parse_interval(interval) if interval is not None else None
        store = open_store(config)
    except LooplineError as err:
        fail(err)
    _log_to_stderr()
    show = _print_json_line if json_out else _pass_printer(always=once)
    if not json_out:
        envs = ", ".join(cfg.monitor.environments)
        every = seconds if seconds is not None else cfg.monitor.interval_s
        err_console.print(
            escape(
                f"monitoring {envs}: {len(cfg.monitor.rules)} rules, "
                + ("one pass" if once else f"a pass every {every:g} s; Ctrl-C stops")
            ),
            highlight=False,
            soft_wrap=True,
        )
    with RichReporter(quiet=json_out) as reporter:
        report = service.run(
            cfg,
            interval_s=seconds,
            once=once,
            reporter=reporter,
            on_pass=show,
            store=store,
            metrics_port=metrics_port,
        )
    if once and report is not None and report.errors:
        raise typer.Exit(1)


def _log_to_stderr() -> None:
    """The monitor's log (and the ``log`` channel) on stderr, unless logging is set up."""
    import logging

    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.WARNING,
            stream=sys.stderr,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        logging.getLogger("loopline").setLevel(logging.INFO)


def _print_json_line(report: PassReport) -> None:
    sys.stdout.write(json.dumps(report.to_dict(), default=str, separators=(",", ":")) + "\n")
    sys.stdout.flush()


_KIND_STYLE = {"firing": "bold red", "pending": "yellow", "resolved": "green"}


def _pass_printer(*, always: bool) -> Any:
    """Prints a pass: every one with ``always``, else those that read or did something."""
    first = [True]

    def show(report: PassReport) -> None:
        busy = report.changes or report.notifications or report.loops or report.errors
        fresh = any(e.get("new_outcomes") or e.get("new_logged") for e in report.environments)
        if always or first[0] or busy or fresh:
            _print_pass(report)
        first[0] = False

    return show


def _print_pass(report: PassReport) -> None:
    at = report.at.strftime("%H:%M:%S")
    seen = [e for e in report.environments if e.get("deployed")]
    summary = (
        ", ".join(
            f"{e['environment']} {e['model']}:{'+'.join(map(str, e['versions']))} "
            f"+{e['new_outcomes']} labels +{e['new_logged']} predictions"
            + (" (state written by another monitor)" if e.get("state") == "conflict" else "")
            for e in seen
        )
        or "nothing deployed in the watched environments"
    )
    console.print(
        f"[dim]{at}[/dim] {escape(summary)} [dim]({report.seconds:.2f} s)[/dim]",
        highlight=False,
        soft_wrap=True,
    )
    for c in report.changes:
        style = _KIND_STYLE.get(c["kind"], "white")
        where = f"{c['environment']} {c['model']}:{c['version']}"
        if c["scope"] != "global":
            where += f" [{c['scope']}]"
        muted = " (notification inhibited)" if c.get("inhibited") else ""
        console.print(
            f"  [{style}]{c['kind'].upper():<8}[/{style}] "
            + escape(
                f"#{c['alert_id']} {c['rule']} ({c['severity']}) on {where}: {c['metric']} "
                f"{_num(c['value'])} over {c['samples']} samples{muted}"
            ),
            highlight=False,
            soft_wrap=True,
        )
    for n in report.notifications:
        failed = [r["channel"] for r in n["channels"] if not r.get("ok")]
        sent = [r["channel"] for r in n["channels"] if r.get("ok") and not r.get("skipped")]
        text = f"  told {', '.join(sent) or 'no channel'} about #{n['alert_id']} ({n['kind']})"
        if failed:
            text += f"; failed: {', '.join(failed)}"
        console.print(
            escape(text), style="red" if failed else "cyan", highlight=False, soft_wrap=True
        )
    for item in report.loops:
        console.print(
            escape("  loop " + _loop_line(item)), style="magenta", highlight=False, soft_wrap=True
        )
    for error in report.errors:
        print_error(LooplineError(error))


def _loop_line(item: dict[str, Any]) -> str:
    head = f"alert #{item.get('alert_id')}"
    if item.get("loop_id") is not None:
        head += f" loop {item['loop_id']}"
    event = item.get("event")
    if event == "skipped":
        return f"{head}: not started: {item.get('reason')}"
    if event == "error":
        return f"{head}: {item.get('error')}"
    return f"{head}: {event} {item.get('action', '')} -> {item.get('status')} at {item.get('step')}"


def register(app: typer.Typer) -> None:
    """Add ``monitor``, ``alerts``, ``approve`` and ``reject`` to the ``loopline`` CLI."""
    from loopline.cli import alerts

    app.command()(monitor)
    alerts.register(app)

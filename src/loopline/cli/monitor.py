"""``loopline monitor``, ``alerts``, ``approve`` and ``reject``: thin shells over
``loopline.monitor.service`` and ``loopline.monitor.loop``.

``monitor`` evaluates the rules every interval and runs the actions; ``alerts`` lists
alerts (``alerts show ID`` is one alert with its events and the chain its loop made,
``alerts export-prometheus`` the equivalent Prometheus rules); ``approve`` and ``reject``
decide a loop that waits at its approval gate.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from loopline.cli.common import ConfigOpt, JsonOpt, fail, load_config, open_store
from loopline.cli.output import cell, console, err_console, escape, print_error, print_json
from loopline.errors import ConfigError, LooplineError

if TYPE_CHECKING:
    from loopline.monitor.passes import PassReport

alerts_app = typer.Typer(
    help="Alerts: list them, show one with its loop, export Prometheus rules.",
    no_args_is_help=False,
)
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?\s*$")
_STATES = ("pending", "firing", "resolved", "open")


def parse_interval(text: str) -> float:
    """``5s``, ``500ms``, ``2m``, ``1h`` or plain seconds, as seconds (> 0)."""
    match = _DURATION.match(text)
    if match is None or float(match.group(1)) <= 0:
        raise ConfigError(f"interval {text!r}: use a positive duration such as 5s, 500ms, 2m or 1h")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


def _actor() -> str:
    return os.environ.get("USER", "cli")


def _when(value: Any) -> str:
    return str(value)[:19].replace("T", " ") if value else ""


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


# -- loopline alerts ----------------------------------------------------------------------
@alerts_app.callback(invoke_without_command=True)
def alerts_list(
    ctx: typer.Context,
    all_: Annotated[bool, typer.Option("--all", help="Also resolved alerts.")] = False,
    state: Annotated[
        str | None, typer.Option("--state", help="Only pending, firing, resolved or open.")
    ] = None,
    env: Annotated[str | None, typer.Option("--env", help="Only this environment.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many, newest first.")] = 100,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """List alerts, newest first: open ones (pending, firing), or --all, or --state."""
    if ctx.invoked_subcommand is not None:
        return
    from rich import box
    from rich.table import Table
    from rich.text import Text

    try:
        if state is not None and state not in _STATES:
            raise ConfigError(f"--state {state!r}: use one of {', '.join(_STATES)}")
        store = open_store(config)
        wanted = state or (None if all_ else "open")
        records = store.alerts.list(state=wanted, environment=env, limit=limit)
        rows = []
        for a in records:
            row = a.to_dict()
            rec = store.loops.get_by_alert(a.id)
            row["loop"] = (
                None if rec is None else {"id": rec.id, "status": rec.status, "step": rec.step}
            )
            rows.append(row)
    except LooplineError as err:
        fail(err)
    if json_out:
        print_json(rows)
        return
    if not rows:
        console.print(
            "no alerts" if all_ or state else "no open alerts (--all lists resolved ones)"
        )
        return
    # Whole on one line at any width: the id other commands take, and what says most.
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for name in ("id", "state", "rule", "where", "value", "loop"):
        table.add_column(name, no_wrap=name != "where", justify="right" if name == "id" else "left")
    for r in rows:
        loop = r["loop"]
        where = f"{r['environment']} {r['model_name']}:{r['model_version']}"
        if r["scope"] != "global":
            where += f" {r['scope']}"
        style = {"critical": "red", "warning": "yellow"}.get(r["severity"], "")
        value = "-" if r["value"] is None else f"{r['value']:.3g}"
        table.add_row(
            str(r["id"]),
            Text(r["state"], style=style if r["state"] != "resolved" else "green"),
            cell(r["rule"]),
            cell(where),
            f"{value}/{r['samples']}",
            cell(loop["status"] if loop else "-"),
        )
    console.print(table)


@alerts_app.command("show")
def alerts_show(
    alert_id: Annotated[int, typer.Argument(help="The alert's id (from `loopline alerts`).")],
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """One alert: its events, its loop, and the chain its loop made, with times.

    The chain: alert → dataset version → run → model version → replica test → deployment.
    """
    from loopline.monitor import service

    try:
        report = service.alert_report(open_store(config), alert_id)
    except LooplineError as err:
        fail(err)
    if json_out:
        print_json(report)
        return
    a = report["alert"]
    console.print(
        escape(f"alert {a['id']}: {a['rule']} {a['state']} ({a['severity']})"),
        style="bold",
        highlight=False,
        soft_wrap=True,
    )
    console.print(
        escape(
            f"  {a['metric']} {_num(a['value'])} over {a['samples']} samples "
            f"(alert when {a['op']} {a['threshold']:g}) on {a['environment']} "
            f"{a['model_name']}:{a['model_version']}, scope {a['scope']}"
        ),
        highlight=False,
        soft_wrap=True,
    )
    times = [
        f"{k} {_when(a[k + '_at'])}" for k in ("started", "fired", "resolved") if a.get(k + "_at")
    ]
    console.print(escape("  " + ", ".join(times)), highlight=False, soft_wrap=True)
    if a.get("reason"):
        console.print(escape(f"  reason: {a['reason']}"), highlight=False, soft_wrap=True)
    console.print("chain", style="bold")
    for link in report["chain"]:
        text = f"  {_when(link.get('at')):<19}  {link['kind']:<15} {link['id']}"
        if link.get("text"):
            text += f"  {link['text']}"
        console.print(escape(text), highlight=False, soft_wrap=True)
    loop = report["loop"]
    if loop is not None:
        console.print(
            escape(f"loop {loop['id']}: {loop['action']} {loop['status']} at {loop['step']}"),
            style="bold",
            highlight=False,
            soft_wrap=True,
        )
        for step in loop.get("timeline") or []:
            text = f"  {_when(step.get('at')):<19}  {step.get('step') or '':<9} "
            text += f"{step.get('status') or '':<9} {step.get('detail') or ''}"
            console.print(escape(text.rstrip()), highlight=False, soft_wrap=True)
    console.print("events", style="bold")
    for e in report["events"]:
        console.print(
            escape(f"  {_when(e['at'])}  {e['kind']:<14} {e['message'] or ''}  ({e['actor']})"),
            highlight=False,
            soft_wrap=True,
        )


@alerts_app.command("export-prometheus")
def alerts_export_prometheus(
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write here (default stdout).")
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """The alert rules as a Prometheus rule file (validated with promtool when on PATH)."""
    from loopline.monitor import prometheus

    try:
        cfg = load_config(config, project=True)
        text = prometheus.export_rules(cfg)
        prometheus.validate_rules(text)
    except LooplineError as err:
        fail(err)
    if out is None:
        sys.stdout.write(text)
        return
    out.write_text(text)
    count = sum(1 for line in text.splitlines() if line.lstrip().startswith("- alert:"))
    err_console.print(
        escape(f"wrote {count} alerting rules to {out}"), highlight=False, soft_wrap=True
    )


# -- loopline approve / reject --------------------------------------------------------------
def _decide(
    alert_id: int, approve: bool, reason: str | None, config: Path | None, json_out: bool
) -> None:
    from loopline.monitor import loop

    try:
        store = open_store(config)
        rec = loop.decide(store, alert_id, approve, actor=_actor(), reason=reason)
    except LooplineError as err:
        fail(err)
    if json_out:
        print_json(rec.to_dict())
        return
    if approve:
        console.print(
            escape(
                f"alert {alert_id}: approved; loop {rec.id} goes on "
                f"({rec.status}, next step {rec.step}) at the monitor's next pass"
            ),
            highlight=False,
            soft_wrap=True,
        )
    else:
        console.print(
            escape(
                f"alert {alert_id}: rejected; production stays on the incumbent "
                f"(loop {rec.id} {rec.status})"
            ),
            highlight=False,
            soft_wrap=True,
        )


def approve(
    alert_id: Annotated[int, typer.Argument(help="The alert whose loop waits for approval.")],
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Approve the candidate of an alert's loop: it goes on to the replica test and release."""
    _decide(alert_id, True, None, config, json_out)


def reject(
    alert_id: Annotated[int, typer.Argument(help="The alert whose loop waits for approval.")],
    reason: Annotated[str, typer.Option("--reason", "-m", help="Why (kept with the alert).")],
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Reject the candidate of an alert's loop: production stays on the incumbent."""
    _decide(alert_id, False, reason, config, json_out)


def register(app: typer.Typer) -> None:
    """Add ``monitor``, ``alerts``, ``approve`` and ``reject`` to the ``loopline`` CLI."""
    app.command()(monitor)
    app.add_typer(alerts_app, name="alerts")
    app.command()(approve)
    app.command()(reject)

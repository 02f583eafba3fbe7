"""``loopline alerts``, ``approve`` and ``reject``: thin shells over
``loopline.monitor.service`` and ``loopline.monitor.loop``.

``alerts`` lists alerts (``alerts show ID`` is one alert with its events and the chain its
loop made, ``alerts export-prometheus`` the equivalent Prometheus rules); ``approve`` and
``reject`` decide a loop that waits at its approval gate.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from loopline.cli.common import ConfigOpt, JsonOpt, fail, load_config, open_store
from loopline.cli.output import cell, console, err_console, escape, print_json
from loopline.errors import ConfigError, LooplineError

alerts_app = typer.Typer(
    help="Alerts: list them, show one with its loop, export Prometheus rules.",
    no_args_is_help=False,
)
_STATES = ("pending", "firing", "resolved", "open")


def _actor() -> str:
    return os.environ.get("USER", "cli")


def _when(value: Any) -> str:
    return str(value)[:19].replace("T", " ") if value else ""


def _num(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


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
    """Add ``alerts``, ``approve`` and ``reject`` to the ``loopline`` CLI."""
    app.add_typer(alerts_app, name="alerts")
    app.command()(approve)
    app.command()(reject)

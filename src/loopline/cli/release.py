"""``loopline promote``, ``rollback``, ``deployments`` and ``status``: thin shells over
``loopline.deploy.release``. They change or read the desired state in the metadata store;
the environment's servers reconcile to it within their interval."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from loopline.cli.common import ConfigOpt, JsonOpt, fail, load_config, open_store, when
from loopline.cli.output import cell, console, escape, print_json
from loopline.errors import LooplineError

if TYPE_CHECKING:
    from loopline.drivers.metadata.deployments import DeploymentState

ReasonOpt = Annotated[
    str | None, typer.Option("--reason", "-m", help="Why (kept in the history and audit log).")
]


def _describe(dep: DeploymentState) -> str:
    if dep.stable_version is None:
        return f"{dep.environment}: nothing deployed"
    text = f"{dep.environment}: {dep.ref(dep.stable_version)}"
    if dep.candidate_version is not None:
        share = f" {dep.candidate_share:.0%}" if dep.strategy == "canary" else ""
        text += f" + {dep.strategy}{share} {dep.ref(dep.candidate_version)}"
    return text + f" (generation {dep.generation})"


def promote(
    ref: Annotated[str, typer.Argument(help="NAME:VERSION (or NAME@ALIAS) to release.")],
    to: Annotated[str, typer.Option("--to", help="Environment to release to.")] = "production",
    strategy: Annotated[
        str,
        typer.Option(
            help="direct: switch at once; canary: a share of requests first, promoted or "
            "rolled back by itself; shadow: mirror requests, answers stay production's."
        ),
    ] = "direct",
    share: Annotated[
        float | None,
        typer.Option(help="Canary share (0-1) or shadow mirror share; default from the config."),
    ] = None,
    reason: ReasonOpt = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Release a model version to an environment (direct, canary or shadow).

    Only a version whose latest replica test passed (`loopline deploy NAME:VERSION --env
    staging`) can be promoted. The environment's servers follow within their interval.
    """
    from loopline.deploy import release

    try:
        cfg = load_config(config, project=True)
        env = cfg.environment(to)
        store = open_store(config)
        dep = release.promote(
            store, ref, to=to, strategy=strategy, share=share, env=env, reason=reason,
            replica_envs=release.replica_environments(cfg, to),
        )  # fmt: skip
    except LooplineError as err:
        fail(err)
    if json_out:
        print_json(dep.to_dict())
        return
    console.print(escape(f"{_describe(dep)}; servers follow within {env.reconcile_interval_s:g} s"))


def rollback(
    name: Annotated[str, typer.Argument(help="Model NAME whose last release to undo.")],
    env: Annotated[str, typer.Option("--env", help="Environment.")] = "production",
    reason: ReasonOpt = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Undo the last release of a model in an environment.

    A running canary or shadow is removed; otherwise the previous stable version serves
    again. The environment is never left without a model.
    """
    from loopline.deploy import release

    try:
        cfg = load_config(config, project=True)
        cfg.environment(env)
        dep = release.rollback(open_store(config), name, env=env, reason=reason)
    except LooplineError as err:
        fail(err)
    if json_out:
        print_json(dep.to_dict())
        return
    console.print(escape(_describe(dep)))


def deployments(
    env: Annotated[str | None, typer.Option("--env", help="Only this environment.")] = None,
    history: Annotated[int, typer.Option(help="History rows per environment.")] = 10,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Deployment records per environment: versions, traffic shares, history, devices.

    Edge environments list each device with the version it runs.
    """
    from rich.table import Table

    from loopline.deploy import release

    try:
        cfg = load_config(config, project=True)
        if env is not None:
            cfg.environment(env)
        store = open_store(config)
        statuses = [
            s for s in release.environment_status(store, cfg) if env in (None, s.environment)
        ]
        rows: list[dict[str, Any]] = []
        for s in statuses:
            row = s.to_dict()
            row["history"] = store.deployments.history(s.environment, limit=history)
            row["devices"] = store.devices.list(s.environment)
            rows.append(row)
    except LooplineError as err:
        fail(err)
    if json_out:
        print_json(rows)
        return
    table = Table("environment", "target", "stable", "candidate", "strategy", "share", "health",
                  "generation", "updated")  # fmt: skip
    for row in rows:
        dep = row["deployment"] or {}
        name = dep.get("model_name")
        stable, cand = dep.get("stable_version"), dep.get("candidate_version")
        table.add_row(
            cell(row["environment"]),
            cell(row["target"]),
            cell(f"{name}:{stable}" if stable is not None else "-"),
            cell(f"{name}:{cand}" if cand is not None else "-"),
            cell(dep.get("strategy", "-") if cand is not None else "-"),
            f"{dep['candidate_share']:.0%}" if cand is not None else "-",
            cell(row["health"]),
            str(dep.get("generation", 0)),
            cell((dep.get("updated_at") or "")[:19].replace("T", " ")),
        )
    console.print(table)
    for row in rows:
        if row["history"]:
            hist = Table("gen", "action", "stable", "candidate", "actor", "reason", "when",
                         title=f"{row['environment']} history")  # fmt: skip
            for h in row["history"]:
                hist.add_row(
                    str(h["generation"]),
                    cell(h["action"]),
                    cell(h["stable_version"] if h["stable_version"] is not None else "-"),
                    cell(h["candidate_version"] if h["candidate_version"] is not None else "-"),
                    cell(h["actor"]),
                    cell(h["reason"] or ""),
                    cell(h["at"][:19].replace("T", " ")),
                )
            console.print(hist)
        if row["devices"]:
            devs = Table("device", "version", "status", "via", "last seen",
                         title=f"{row['environment']} devices")  # fmt: skip
            for d in row["devices"]:
                devs.add_row(
                    cell(d.get("device_id")),
                    cell(f"{d.get('model_name')}:{d.get('model_version')}"),
                    cell(d.get("status")),
                    cell(d.get("via") or ""),
                    cell(str(d.get("last_seen") or "")[:19].replace("T", " ")),
                )
            console.print(devs)


def status(
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """What runs where: versions serving, traffic shares and replica health.

    Health comes from what each replica last reported to the metadata store.
    """
    from loopline.deploy import release

    try:
        cfg = load_config(config, project=True)
        statuses = release.environment_status(open_store(config), cfg)
    except LooplineError as err:
        fail(err)
    if json_out:
        print_json([s.to_dict() for s in statuses])
        return
    for s in statuses:
        traffic = ", ".join(f"{ref} {share:.0%}" for ref, share in s.traffic.items()) or "-"
        console.print(
            escape(f"{s.environment} ({s.target}, {s.endpoint}): {s.health}"), style="bold"
        )
        console.print(escape(f"  traffic   {traffic}"))
        for r in s.replicas:
            versions = ",".join(map(str, r["versions"])) or "-"
            line = f"  replica   {r['replica_id']} {r['status']} versions {versions}"
            line += f" generation {r['generation']} seen {when(_ts(r['last_seen']))}"
            if r.get("error"):
                line += f" ({r['error']})"
            console.print(escape(line))


def _ts(value: str | None) -> Any:
    from datetime import datetime

    return datetime.fromisoformat(value) if value else None


def register(app: typer.Typer) -> None:
    app.command()(promote)
    app.command()(rollback)
    app.command()(deployments)
    app.command()(status)

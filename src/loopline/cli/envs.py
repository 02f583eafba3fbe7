"""``loopline up`` / ``loopline down``: run an environment's servers in the background, or stop
them, through the environment's target (``local`` by default)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from loopline.cli.common import ConfigOpt, JsonOpt, fail, load_config
from loopline.cli.output import console, err_console, print_error, print_json
from loopline.errors import ConfigError, LooplineError

if TYPE_CHECKING:
    from loopline.drivers.targets import Outcome, Target, TargetContext

EnvOpt = Annotated[str, typer.Option("--env", "-e", help="The environment, e.g. staging.")]
WaitOpt = Annotated[
    float,
    typer.Option("--wait-s", min=0.0, help="How long to wait for a healthy server (0: don't)."),
]


def _context(env: str, config: Path | None, **extra: object) -> tuple[Target, TargetContext]:
    """The environment's target and what it needs; a missing target module is one line."""
    from loopline.config import DEFAULT_CONFIG_FILE
    from loopline.drivers.targets import TargetContext, get_target

    cfg = load_config(config, project=True)
    settings = cfg.environment(env)
    try:
        target = get_target(settings.target)
    except ConfigError as err:  # a target not installed: say which environment wants it
        raise ConfigError(f"environment {env}: {err}") from None
    path = (config or Path(DEFAULT_CONFIG_FILE)).resolve()
    return target, TargetContext(
        config=cfg, environment=env, env=settings, extra={"config_path": path, **extra}
    )


def _report(outcome: Outcome, json_out: bool) -> None:
    """The outcome in words (or JSON); a failure ends with one error line and exit 1."""
    if json_out:
        print_json(
            {
                "ok": outcome.ok,
                "message": outcome.message,
                "details": outcome.details,
                "commands": outcome.commands,
            }
        )
    elif outcome.ok:
        console.print(escape(outcome.message), highlight=False, soft_wrap=True)
    for command in outcome.commands if not json_out else []:
        console.print(f"  {escape(command)}", highlight=False, soft_wrap=True)
    if outcome.ok:
        return
    lines = outcome.details.get("log_tail") or []
    if lines and not json_out:
        err_console.print(
            f"last {len(lines)} lines of {escape(str(outcome.details.get('log', 'the log')))}:",
            highlight=False,
            soft_wrap=True,
        )
        for line in lines:
            err_console.print(f"  {escape(line)}", highlight=False, soft_wrap=True)
    print_error(LooplineError(outcome.message))
    raise typer.Exit(1)


def up(
    env: EnvOpt,
    config: ConfigOpt = None,
    wait_s: WaitOpt = 60.0,
    json_out: JsonOpt = False,
) -> None:
    """Start the environment's servers in the background and wait until they are healthy."""
    try:
        target, ctx = _context(env, config, wait_s=wait_s)
        if ctx.env.target in BUNDLE_TARGETS:
            outcome = _up_with_bundle(target, ctx, config)
        else:  # the servers read the desired state themselves
            outcome = target.up(ctx)
    except LooplineError as err:
        fail(err)
    _report(outcome, json_out)


# Targets that run one image per version: they are handed the deployed version's bundle.
BUNDLE_TARGETS = ("container", "vm", "kubernetes")


def _up_with_bundle(target: Target, ctx: TargetContext, config: Path | None) -> Outcome:
    """``up`` for a target that runs one bundle: the environment's deployed version (the
    candidate of a canary, with its share, on kubernetes)."""
    from loopline.cli.common import open_store
    from loopline.drivers.targets.context import open_context

    dep = open_store(config).deployments.get(ctx.environment)
    if dep is None or dep.stable_version is None:
        raise ConfigError(
            f"{ctx.environment} has no deployed version yet; promote one first "
            f"(`loopline promote NAME:VERSION --to {ctx.environment}`)"
        )
    version, extra = dep.stable_version, dict(ctx.extra)
    canary = dep.strategy == "canary" and dep.candidate_version is not None
    if canary and ctx.env.target == "kubernetes" and dep.candidate_version is not None:
        version = dep.candidate_version
        extra["canary_percent"] = round(dep.candidate_share * 100)
    with open_context(ctx.config, ctx.environment, f"{dep.model_name}:{version}", extra) as full:
        return target.up(full)


def down(env: EnvOpt, config: ConfigOpt = None, json_out: JsonOpt = False) -> None:
    """Stop the environment's servers (nothing running is fine)."""
    try:
        target, ctx = _context(env, config)
        outcome = target.down(ctx)
    except LooplineError as err:
        fail(err)
    _report(outcome, json_out)


def register(app: typer.Typer) -> None:
    """Add ``up`` and ``down`` to the ``loopline`` CLI."""
    app.command()(up)
    app.command()(down)

"""``loopline render``: write what a target would apply, without applying it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from loopline.cli.common import ConfigOpt, JsonOpt, fail, load_config
from loopline.cli.output import console, print_json
from loopline.errors import ConfigError, LooplineError


def render(
    ref: Annotated[str, typer.Argument(help="NAME:VERSION (or NAME@ALIAS) to render.")],
    target: Annotated[
        str, typer.Option(help="kubernetes, container, vm or edge (any configured target).")
    ],
    out: Annotated[Path, typer.Option(help="Folder to write (must not exist or be empty).")],
    env: Annotated[str, typer.Option(help="Environment whose settings apply.")] = "production",
    canary_percent: Annotated[
        int | None,
        typer.Option(help="kubernetes: the InferenceService's canaryTrafficPercent (0-100)."),
    ] = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Write the manifests, unit or build context a target would apply, without applying.

    kubernetes: Deployment, Service, HPA, PDB, KServe InferenceService, kustomization.
    container: the verified bundle and a Dockerfile with the model's identity.
    vm: a systemd unit and install.sh. edge: the edge target's bundle and agent.
    """
    from loopline.drivers.targets import render as render_target

    try:
        extra = {}
        if canary_percent is not None:
            if target != "kubernetes":
                raise ConfigError("--canary-percent applies to --target kubernetes only")
            extra["canary_percent"] = canary_percent
        cfg = load_config(config, project=True)
        files = render_target(cfg, env, ref, target, out, extra)
    except LooplineError as err:
        fail(err)
    except OSError as err:
        fail(LooplineError(f"cannot write {out}: {err}"))
    rel = sorted(p.relative_to(out).as_posix() for p in files)
    if json_out:
        print_json(
            {"target": target, "environment": env, "ref": ref, "out": str(out), "files": rel}
        )
        return
    top = sorted({name.split("/", 1)[0] + ("/" if "/" in name else "") for name in rel})
    console.print(
        escape(f"wrote {len(rel)} files for {ref} (target {target}, environment {env}) to {out}")
    )
    for name in top:
        console.print(escape(f"  {name}"), highlight=False)

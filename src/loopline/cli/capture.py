"""``loopline capture``: list captured production images and purge them by retention."""

from __future__ import annotations

from typing import Annotated

import typer

from loopline.cli.common import ConfigOpt, JsonOpt, fail, load_config, when
from loopline.cli.output import cell, console, print_json
from loopline.errors import LooplineError

app = typer.Typer(
    help="Captured production images: list them, purge them by retention.",
    no_args_is_help=True,
)

EnvOpt = Annotated[str, typer.Option("--env", help="Environment whose capture policy applies.")]


@app.command("list")
def list_captures(
    config: ConfigOpt = None,
    limit: Annotated[int, typer.Option(help="How many, newest first.", min=1)] = 50,
    env: Annotated[
        str | None, typer.Option("--env", help="Only captures of this environment.")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """List captured images, newest first (the images themselves need a token to read)."""
    from rich.table import Table

    from loopline.drivers.metadata.store import MetadataStore

    try:
        store = MetadataStore(load_config(config, project=True).metadata_url())
        rows = store.captures.recent(limit, environment=env)
        total = store.captures.count(environment=env)
    except LooplineError as err:
        fail(err)
    if json_out:
        print_json([r.to_dict() for r in rows])
        return
    table = Table("prediction", "sha256", "bytes", "type", "environment", "captured",
                  "expires", "dataset")  # fmt: skip
    for r in rows:
        table.add_row(
            cell(r.prediction_id), r.sha256[:12], str(r.bytes), cell(r.media_type),
            cell(r.environment), when(r.at), when(r.expires_at), cell(r.dataset_version),
        )  # fmt: skip
    console.print(table)
    console.print(f"{len(rows)} of {total} capture(s)", highlight=False)


@app.command("purge")
def purge(
    config: ConfigOpt = None,
    env: EnvOpt = "production",
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would be deleted; delete nothing.")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Delete captures past the environment's retention or beyond its size cap (unless a
    labelled dataset version references them), then the images no capture needs."""
    from loopline.deploy.capture import purge_captures
    from loopline.drivers.artifacts.store import ArtifactStore
    from loopline.drivers.metadata.store import MetadataStore

    try:
        cfg = load_config(config, project=True)
        policy = cfg.environment(env).capture
        store = MetadataStore(cfg.metadata_url())
        report = purge_captures(
            store,
            ArtifactStore(cfg.artifacts_url()),
            retention_days=policy.retention_days,
            max_total_bytes=policy.max_total_bytes,
            dry_run=dry_run,
        )
    except LooplineError as err:
        fail(err)
    if json_out:
        print_json({"environment": env, **report.to_dict()})
        return
    result = report.result
    verb = "would delete" if dry_run else "deleted"
    for r in result.expired:
        console.print(
            f"{verb} {r.prediction_id} (past retention, captured {when(r.at)})", highlight=False
        )
    for r in result.over_cap:
        console.print(f"{verb} {r.prediction_id} (over the size cap)", highlight=False)
    blobs = len(result.orphaned) if dry_run else len(report.blobs_deleted)
    console.print(
        f"{verb} {len(result.deleted)} capture(s) and {blobs} image blob(s); "
        f"{result.remaining_rows} capture(s), {result.remaining_bytes} bytes kept "
        f"(retention {policy.retention_days:g} days, cap {policy.max_total_bytes} bytes, "
        f"environment {env})",
        highlight=False,
        soft_wrap=True,
    )

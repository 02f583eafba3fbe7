"""``loopline models``: the registry's versions, metrics, aliases and bundles."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from loopline.cli.common import ConfigOpt, JsonOpt, fail, load_config, open_store
from loopline.cli.output import console, print_json
from loopline.errors import LooplineError

app = typer.Typer(help="The model registry: versions, metrics, aliases, lineage.")


@app.callback(invoke_without_command=True)
def models_list(ctx: typer.Context, config: ConfigOpt = None, json_out: JsonOpt = False) -> None:
    """List registered model versions with their aliases and headline metrics."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.table import Table

    try:
        store = open_store(config)
        rows = [store.model_version_dict(mv) for mv in store.list_model_versions()]
    except LooplineError as err:
        fail(err)
    if json_out:
        print_json(rows)
        return
    table = Table("model", "version", "aliases", "accuracy", "macro-F1", "dataset", "run")
    for m in rows:
        met = m["metrics"]
        table.add_row(
            m["name"],
            str(m["version"]),
            ",".join(m["aliases"]),
            f"{met.get('accuracy', 0):.3f}",
            f"{met.get('macro_f1', 0):.3f}",
            (m["dataset_version"] or "")[:12],
            m["run_id"] or "",
        )
    console.print(table)


@app.command("show")
def models_show(
    ref: Annotated[str, typer.Argument(help="NAME, NAME:VERSION or NAME@ALIAS.")],
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Show one model version: metrics per class and segment, bundle and lineage."""
    try:
        store = open_store(config)
        data = store.model_version_dict(store.resolve_model(ref))
    except LooplineError as err:
        fail(err)
    if json_out:
        print_json(data)
        return
    from rich.table import Table

    met = data["metrics"]
    console.print(
        f"[bold]{data['name']}:{data['version']}[/bold] "
        f"aliases: {', '.join(data['aliases']) or '-'}"
    )
    console.print(
        f"accuracy {met['accuracy']:.4f}  macro P/R/F1 {met['macro_precision']:.4f} / "
        f"{met['macro_recall']:.4f} / {met['macro_f1']:.4f}"
    )
    table = Table("class", "precision", "recall", "F1", "support")
    for label, r in met.get("per_class", {}).items():
        table.add_row(
            label,
            f"{r['precision']:.3f}",
            f"{r['recall']:.3f}",
            f"{r['f1']:.3f}",
            str(r["support"]),
        )
    console.print(table)
    for column, values in met.get("segments", {}).items():
        console.print(
            f"by {column}: " + ", ".join(f"{v} acc {r['accuracy']:.3f}" for v, r in values.items())
        )
    console.print(f"bundle {data['bundle_uri']}\nsha256 {data['bundle_sha256']}")
    lin = data["lineage"]
    console.print(
        f"dataset {data['dataset_version']}  run {data['run_id']}  "
        f"git {lin.get('git_commit') or '-'}  loopline {lin.get('loopline_version')}"
    )
    console.print(f"params {lin.get('params')}")


@app.command("alias")
def models_alias(
    ref: Annotated[str, typer.Argument(help="NAME:VERSION to point the alias at.")],
    alias: Annotated[str, typer.Argument(help="Alias, e.g. staging or production.")],
    config: ConfigOpt = None,
) -> None:
    """Point an alias (e.g. production) at a model version; recorded in the audit log."""
    from loopline.drivers.metadata.store import parse_model_ref

    try:
        name, version, _ = parse_model_ref(ref)
        if version is None:
            raise LooplineError(f"give an explicit version: {name}:VERSION")
        open_store(config).set_alias(name, alias, version, actor=os.environ.get("USER", "cli"))
    except LooplineError as err:
        fail(err)
    console.print(f"{name}@{alias} -> {name}:{version}")


@app.command("export")
def models_export(
    ref: Annotated[str, typer.Argument(help="NAME, NAME:VERSION or NAME@ALIAS.")],
    out: Annotated[Path, typer.Option(help="Folder to write (must not exist or be empty).")],
    config: ConfigOpt = None,
) -> None:
    """Write a model's bundle, verified, to a folder: the build context of its serving image.

    The folder holds model.onnx, labels, preprocessing, metadata, the manifest, and a
    Dockerfile with its requirements: `docker build -t NAME:VERSION FOLDER` builds a
    torch-free image that serves the model on port 8080.
    """
    import shutil
    import tempfile

    from loopline.bundle import extract_bundle
    from loopline.drivers.artifacts import ArtifactStore

    try:
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise LooplineError(f"{out} exists and is not an empty folder; choose another --out")
        cfg = load_config(config)
        mv = open_store(config).resolve_model(ref)
        artifacts = ArtifactStore(cfg.artifacts_url())
        with tempfile.TemporaryDirectory() as tmp:
            tar = artifacts.get_file(mv.bundle_sha256, Path(tmp) / "bundle.tar")
            if out.exists():
                out.rmdir()
            extract_bundle(tar, out)
    except LooplineError as err:
        fail(err)
    except OSError as err:
        shutil.rmtree(out, ignore_errors=True)
        fail(LooplineError(f"cannot write {out}: {err}"))
    tag = f"{mv.name}:{mv.version}"
    console.print(f"wrote {tag} to {out} (sha256 {mv.bundle_sha256[:12]} verified)")
    console.print(f"build: docker build -t {tag} {out}   (or podman build)")
    console.print(
        f"run:   docker run -p 8080:8080 -e LOOPLINE_MODEL_VERSION={mv.version} "
        f"-e LOOPLINE_SERVE_TOKEN=... {tag}"
    )

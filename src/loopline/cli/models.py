"""``loopline models``: the registry's versions, metrics, aliases and bundles."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape

from loopline.cli.common import ConfigOpt, JsonOpt, fail, load_config, open_store
from loopline.cli.output import cell, console, print_json
from loopline.errors import LooplineError

if TYPE_CHECKING:
    from loopline.drivers.metadata.store import MetadataStore

app = typer.Typer(help="The model registry: versions, metrics, aliases, lineage.")


def _actor() -> str:
    return os.environ.get("USER", "cli")


@app.callback(invoke_without_command=True)
def models_list(
    ctx: typer.Context,
    config: ConfigOpt = None,
    all_: Annotated[bool, typer.Option("--all", help="Also list archived versions.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """List registered model versions with their aliases and headline metrics."""
    if ctx.invoked_subcommand is not None:
        return
    from rich import box
    from rich.table import Table

    try:
        store = open_store(config)
        versions = store.models.versions(include_archived=all_)
        rows = [store.models.as_dict(mv) for mv in versions]
    except LooplineError as err:
        fail(err)
    if json_out:
        print_json(rows)
        return
    # Names and run ids are what other commands take: whole, on one line, at any width;
    # the other columns wrap or shorten instead.
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column(
        "model", no_wrap=True, min_width=max((len(m["name"]) for m in rows), default=5)
    )
    table.add_column("ver", justify="right", no_wrap=True)
    table.add_column("aliases", overflow="fold")
    table.add_column("acc", no_wrap=True)
    table.add_column("F1", no_wrap=True)
    table.add_column("dataset", overflow="ellipsis")
    run_width = max((len(m["run_id"] or "") for m in rows), default=3)
    table.add_column("run", no_wrap=True, min_width=run_width)
    if all_:
        table.add_column("archived")
    for m in rows:
        met = m["metrics"]
        archived = [_when(m.get("archived_at"))] if all_ else []
        table.add_row(
            cell(m["name"]),
            str(m["version"]),
            cell(",".join(m["aliases"])),
            _short(met, "accuracy"),
            _short(met, "macro_f1"),
            (m["dataset_version"] or ("imported" if m["lineage"].get("imported") else ""))[:8],
            cell(m["run_id"] or ""),
            *archived,
        )
    console.print(table)


def _when(value: Any) -> str:
    return str(value)[:19].replace("T", " ") if value else ""


@app.command("show")
def models_show(
    ref: Annotated[str, typer.Argument(help="NAME, NAME:VERSION or NAME@ALIAS.")],
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Show one model version: metrics per class and segment, bundle and lineage."""
    try:
        store = open_store(config)
        data = store.models.as_dict(store.models.resolve(ref))
    except LooplineError as err:
        fail(err)
    if json_out:
        print_json(data)
        return
    from rich.table import Table

    met = data["metrics"]
    archived = (
        f"  [yellow]archived {_when(data['archived_at'])}[/yellow]"
        if data.get("archived_at")
        else ""
    )
    console.print(
        f"[bold]{escape(data['name'])}:{data['version']}[/bold] "
        f"aliases: {escape(', '.join(data['aliases'])) or '-'}{archived}"
    )
    if data["lineage"].get("imported"):
        origin = data["lineage"]
        console.print(
            escape(
                f"imported from {origin.get('source_file')} (sha256 {origin.get('sha256')}); "
                "no metrics: it was not built here"
            ),
            highlight=False,
        )
    console.print(
        f"accuracy {_num(met, 'accuracy')}  macro P/R/F1 {_num(met, 'macro_precision')} / "
        f"{_num(met, 'macro_recall')} / {_num(met, 'macro_f1')}"
    )
    table = Table("class", "precision", "recall", "F1", "support")
    for label, r in met.get("per_class", {}).items():
        table.add_row(
            cell(label),
            f"{r['precision']:.3f}",
            f"{r['recall']:.3f}",
            f"{r['f1']:.3f}",
            str(r["support"]),
        )
    console.print(table)
    for column, values in met.get("segments", {}).items():
        shares = ", ".join(f"{v} acc {r['accuracy']:.3f}" for v, r in values.items())
        console.print(escape(f"by {column}: {shares}"), highlight=False)
    console.print(escape(f"bundle {data['bundle_uri']}\nsha256 {data['bundle_sha256']}"))
    lin = data["lineage"]
    console.print(
        escape(
            f"dataset {data['dataset_version']}  run {data['run_id']}  "
            f"git {lin.get('git_commit') or '-'}  loopline {lin.get('loopline_version')}"
        )
    )
    console.print(escape(f"params {lin.get('params')}"), highlight=False)


def _short(metrics: dict[str, Any], key: str) -> str:
    """A metric for the listing; "-" where there is none (an imported model's, say)."""
    value = metrics.get(key)
    return f"{value:.3f}" if isinstance(value, int | float) else "-"


def _num(metrics: dict[str, Any], key: str) -> str:
    value = metrics.get(key)
    return f"{value:.4f}" if isinstance(value, int | float) else "-"


def _parse_expect(raw: str | None) -> Any:
    """``--expect``: a version number, or ``none`` (the alias must not exist yet)."""
    from loopline.drivers.metadata.registry import UNCONDITIONAL

    if raw is None:
        return UNCONDITIONAL
    if raw.lower() == "none":
        return None
    try:
        return int(raw)
    except ValueError:
        raise LooplineError(
            f"--expect {raw!r}: give the version the alias must point at now, e.g. "
            "--expect 3, or --expect none for an alias that must not exist yet"
        ) from None


def _versioned(ref: str, what: str) -> tuple[str, int]:
    from loopline.drivers.metadata.registry import parse_model_ref

    name, version, alias = parse_model_ref(ref)
    if version is None or alias is not None:
        raise LooplineError(f"{what} needs an explicit version: {name}:VERSION, not {ref!r}")
    return name, version


@app.command("alias")
def models_alias(
    ref: Annotated[
        str,
        typer.Argument(
            help="NAME:VERSION to point the alias at; with --delete, NAME (or NAME:VERSION "
            "to delete only while the alias points there)."
        ),
    ],
    alias: Annotated[str, typer.Argument(help="Alias, e.g. staging or production.")],
    expect: Annotated[
        str | None,
        typer.Option(
            help="Change the alias only if it points at this version now ('none': only if "
            "it does not exist yet); otherwise exit 1 and change nothing."
        ),
    ] = None,
    delete: Annotated[bool, typer.Option("--delete", help="Remove the alias.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Point an alias (e.g. production) at a model version, or delete it; audited.

    With --expect the move is compare-and-set: two people (or the loop) moving one alias
    at once cannot both win, and neither overwrites the other unseen.
    """
    from loopline.drivers.metadata.registry import UNCONDITIONAL, parse_model_ref

    try:
        expected = _parse_expect(expect)
        if delete:
            name, version, at = parse_model_ref(ref)
            if at is not None:
                raise LooplineError(f"--delete takes NAME or NAME:VERSION, not {ref!r}")
            if version is not None:
                if expected is not UNCONDITIONAL and expected != version:
                    raise LooplineError(f"{ref} and --expect {expect} name different versions")
                expected = version
            if expected is None:
                raise LooplineError("--expect none cannot be combined with --delete")
            held = open_store(config).models.delete_alias(
                name, alias, expected=expected, actor=_actor()
            )
        else:
            name, version = _versioned(ref, "an alias")
            store = open_store(config)
            store.models.set_alias(name, alias, version, expected=expected, actor=_actor())
    except LooplineError as err:
        fail(err)
    if delete:
        console.print(escape(f"deleted {name}@{alias} (it pointed at {name}:{held})"))
    else:
        console.print(escape(f"{name}@{alias} -> {name}:{version}"))


def _set_archived(store: MetadataStore, name: str, version: int, archived: bool) -> Any:
    if archived:
        return store.models.archive_version(name, version, actor=_actor())
    return store.models.unarchive_version(name, version, actor=_actor())


@app.command("archive")
def models_archive(
    ref: Annotated[str, typer.Argument(help="NAME:VERSION to archive.")],
    config: ConfigOpt = None,
) -> None:
    """Archive a version: hidden from `loopline models` (see --all), never aliased again
    until unarchived, still reachable as NAME:VERSION. Refused while it holds an alias."""
    try:
        name, version = _versioned(ref, "archive")
        _set_archived(open_store(config), name, version, archived=True)
    except LooplineError as err:
        fail(err)
    console.print(escape(f"archived {name}:{version}"))


@app.command("unarchive")
def models_unarchive(
    ref: Annotated[str, typer.Argument(help="NAME:VERSION to bring back.")],
    config: ConfigOpt = None,
) -> None:
    """Bring an archived version back into listings and within reach of aliases."""
    try:
        name, version = _versioned(ref, "unarchive")
        _set_archived(open_store(config), name, version, archived=False)
    except LooplineError as err:
        fail(err)
    console.print(escape(f"unarchived {name}:{version}"))


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
        cfg = load_config(config, project=True)
        mv = open_store(config).models.resolve(ref)
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
    console.print(escape(f"wrote {tag} to {out} (sha256 {mv.bundle_sha256[:12]} verified)"))
    console.print(escape(f"build: docker build -t {tag} {out}   (or podman build)"))
    console.print(
        escape(
            f"run:   docker run -p 8080:8080 -e LOOPLINE_MODEL_VERSION={mv.version} "
            f"-e LOOPLINE_SERVE_TOKEN=... {tag}"
        )
    )


@app.command("import")
def models_import(
    file: Annotated[Path, typer.Argument(help="The ONNX model: float32 [N,3,H,W] to [N,C].")],
    name: Annotated[str, typer.Option("--name", help="Model name to register it as.")],
    labels: Annotated[
        str, typer.Option("--labels", help="Class names in output order, e.g. car,van,truck.")
    ],
    input_size: Annotated[
        str | None,
        typer.Option("--input-size", help="H,W; needed when the model does not fix it."),
    ] = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Register a model trained elsewhere as a verified bundle (lineage: imported).

    ONNX Runtime checks it first: one float32 input [N,3,H,W] of RGB pixels 0..255
    (normalisation inside the graph) and one output [N,C], C the number of labels. The
    new version gets the alias candidate and can be served, deployed and monitored; it
    has no metrics until evaluated. The same file imported again registers nothing.
    """
    from loopline.deploy.importing import import_onnx, parse_input_size, parse_labels
    from loopline.drivers.artifacts import ArtifactStore

    try:
        size = parse_input_size(input_size) if input_size is not None else None
        classes = parse_labels(labels)
        cfg = load_config(config, project=True)
        store = open_store(config)
        result = import_onnx(
            store, ArtifactStore(cfg.artifacts_url()), file, name, classes, size, actor=_actor()
        )
    except LooplineError as err:
        fail(err)
    if json_out:
        print_json(result.to_dict())
        return
    tag = f"{result.name}:{result.version}"
    if result.created:
        console.print(escape(f"imported {file.name} as {tag} (alias candidate)"))
    else:
        console.print(escape(f"{file.name} equals {tag}; nothing registered"))
    console.print(escape(f"bundle sha256 {result.bundle_sha256}"), highlight=False)

"""The ``loopline`` command: thin Typer commands over the library API.

Heavy modules (torch, the build steps, the server) are imported inside the commands that
need them, so ``loopline --help`` stays fast.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from loopline import __version__
from loopline.cli import serve as serve_command
from loopline.cli.output import console, err_console, print_json
from loopline.errors import LooplineError

app = typer.Typer(
    name="loopline",
    help="Closed-loop MLOps: build, deploy and monitor models as one loop.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
runs_app = typer.Typer(help="Pipeline runs: list them, or show one with its steps and trials.")
models_app = typer.Typer(help="The model registry: versions, metrics, aliases, lineage.")
app.add_typer(runs_app, name="runs")
app.add_typer(models_app, name="models")

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="Config file (default ./loopline.yaml).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


def _version(value: bool) -> None:
    if value:
        console.print(f"loopline {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show version.")
    ] = False,
) -> None:
    """Loopline: ingest, validate, train, evaluate, gate, package and register models."""


def fail(err: LooplineError) -> None:
    err_console.print(f"[red]error:[/red] {err}", highlight=False, soft_wrap=True)
    raise typer.Exit(err.exit_code)


def _config(path: Path | None, overrides: list[str] | None = None) -> Any:
    from loopline.config import load_config

    return load_config(path, overrides or [])


def _store(config_path: Path | None) -> Any:
    from loopline.drivers.metadata.store import MetadataStore

    return MetadataStore(_config(config_path).metadata_url())


# -- init / datagen ---------------------------------------------------------------------------
@app.command()
def init(
    directory: Annotated[Path, typer.Argument(help="Project folder.")] = Path("."),
    force: Annotated[bool, typer.Option(help="Overwrite an existing loopline.yaml.")] = False,
) -> None:
    """Write a starter loopline.yaml for the vehicle example (data lake at ./lake)."""
    from importlib.resources import files

    target = directory / "loopline.yaml"
    if target.exists() and not force:
        fail(LooplineError(f"{target} exists; use --force to overwrite it"))
    directory.mkdir(parents=True, exist_ok=True)
    template = files("loopline.examples.vehicles").joinpath("loopline.yaml").read_text()
    target.write_text(template)
    console.print(f"wrote {target}; next: loopline datagen && loopline build")


@app.command()
def datagen(
    out: Annotated[Path, typer.Option(help="Folder of the lake to write.")] = Path("lake"),
    images: Annotated[int, typer.Option(help="Number of images.")] = 5000,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same lake).")] = 0,
    conditions: Annotated[
        str, typer.Option(help="Comma-separated: day,night,fog,rain.")
    ] = "day,night,fog,rain",
    cameras: Annotated[int, typer.Option(help="Number of cameras.")] = 4,
    json_out: JsonOpt = False,
) -> None:
    """Write a synthetic highway-CCTV data lake (images + manifest.csv) for the example."""
    from rich.progress import Progress

    from loopline.examples.vehicles.datagen import generate_lake

    names = [c.strip() for c in conditions.split(",") if c.strip()]
    try:
        with Progress(console=err_console, transient=True, disable=json_out) as progress:
            task = progress.add_task("generating images", total=images)
            summary = generate_lake(
                out,
                images=images,
                seed=seed,
                conditions=names,
                cameras=cameras,
                progress=lambda n: progress.advance(task, n),
            )
    except LooplineError as err:
        fail(err)
    data = {
        "out": str(summary.out),
        "images": summary.images,
        "per_class": summary.per_class,
        "per_condition": summary.per_condition,
        "defects": summary.defects,
    }
    if json_out:
        print_json(data)
    else:
        console.print(
            f"wrote {summary.images} images to {summary.out} "
            f"({', '.join(f'{k} {v}' for k, v in summary.defects.items())} defects on purpose)"
        )


# -- build ------------------------------------------------------------------------------------
@app.command()
def build(
    config: ConfigOpt = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config key, e.g. --set train.epochs=1."),
    ] = None,
    resume: Annotated[
        str | None, typer.Option(help="Continue a failed or interrupted run from its failed step.")
    ] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Run every step.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Run the Build pipeline: ingest, validate, split, train, evaluate, gate, package, register.

    Exit codes: 0 a model was registered, 3 the gate rejected it, 1 an error.
    """
    from loopline.builder import build as run_build
    from loopline.cli.output import RichReporter

    try:
        if resume and set_:
            raise LooplineError(
                "--set cannot be combined with --resume: a resumed run keeps the configuration "
                "it was started with (start a new build to change it)"
            )
        cfg = _config(config, set_)
        with RichReporter(quiet=json_out) as reporter:
            result = run_build(
                cfg,
                resume=resume,
                reporter=reporter,
                use_cache=not no_cache,
                actor=os.environ.get("USER", "cli"),
            )
    except LooplineError as err:
        fail(err)
    if json_out:
        print_json(
            {
                "run_id": result.run_id,
                "status": result.status,
                "model": result.model,
                "reason": result.reason,
                "steps": result.steps,
            }
        )
    elif result.status == "succeeded" and result.model:
        m = result.model
        met = m["metrics"]
        fresh = any(step["status"] != "cached" for step in result.steps)
        verb = "[green]registered[/green]" if fresh else "nothing changed, up to date:"
        console.print(
            f"{verb} {m['name']}:{m['version']} (run {result.run_id}) "
            f"accuracy {met['accuracy']:.3f} macro-F1 {met['macro_f1']:.3f}"
        )
    else:
        console.print(f"[yellow]{result.reason}[/yellow] (run {result.run_id})")
    if result.status == "rejected":
        raise typer.Exit(3)


# -- runs ---------------------------------------------------------------------------------------
@runs_app.callback(invoke_without_command=True)
def runs_list(
    ctx: typer.Context,
    config: ConfigOpt = None,
    limit: Annotated[int, typer.Option(help="How many, newest first.")] = 20,
    json_out: JsonOpt = False,
) -> None:
    """List pipeline runs, newest first."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.table import Table

    try:
        runs = _store(config).list_runs(limit)
    except LooplineError as err:
        fail(err)
    if json_out:
        print_json([_run_dict(r) for r in runs])
        return
    table = Table("run", "status", "trigger", "dataset", "model", "started", "error")
    for r in runs:
        model = f"{r.model_name}:{r.model_version}" if r.model_version else ""
        table.add_row(
            r.id,
            r.status,
            r.trigger,
            (r.dataset_version or "")[:12],
            model,
            _when(r.started_at),
            (r.error or "")[:60],
        )
    console.print(table)


def _run_dict(r: Any) -> dict[str, Any]:
    d = r.to_dict()
    d.pop("config", None)
    return d


def _when(ts: Any) -> str:
    return ts.strftime("%Y-%m-%d %H:%M:%S") if ts else ""


@runs_app.command("show")
def runs_show(
    run_id: Annotated[str, typer.Argument(help="Run id (a unique prefix is enough).")],
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Show one run: its steps (ran or cached, timings, digests), HPO trials and step logs
    (validation counts per reason, metrics per segment, the gate's decision)."""
    from rich.table import Table

    try:
        store = _store(config)
        run = store.get_run(run_id)
        steps = store.list_steps(run.id)
        trials = store.list_trials(run.id)
    except LooplineError as err:
        fail(err)
    if json_out:
        data = run.to_dict()
        data["steps"] = [s.to_dict() for s in steps]
        data["trials"] = [t.to_dict() for t in trials]
        print_json(data)
        return
    console.print(
        f"run [bold]{run.id}[/bold] {run.status} ({run.trigger}) "
        f"dataset {(run.dataset_version or '-')[:12]} "
        f"model {run.model_name or '-'}:{run.model_version or '-'}"
    )
    if run.error:
        console.print(f"[red]{run.error}[/red]", highlight=False)
    table = Table("step", "status", "cached", "seconds", "outputs")
    for s in steps:
        outs = ", ".join(f"{k}={v['sha256'][:10]}" for k, v in (s.outputs or {}).items())
        cached = f"from {s.cached_from}" if s.cached else ""
        table.add_row(s.step, s.status, cached, f"{s.duration_s or 0:.2f}", outs)
    console.print(table)
    if trials:
        t = Table("trial", "state", "params", "val macro-F1", "epochs", "seconds")
        for tr in trials:
            t.add_row(
                str(tr.number),
                tr.state,
                str(tr.params),
                f"{tr.value:.4f}" if tr.value is not None else "-",
                str(tr.epochs),
                f"{tr.duration_s or 0:.1f}",
            )
        console.print(t)
    for s in steps:
        if s.log and not s.cached:
            for line in s.log.splitlines():
                console.print(f"  [dim]{s.step}:[/dim] {line}", highlight=False)
        if s.error and s.status == "failed":
            console.print(
                f"  [red]{s.step}: {s.error.strip().splitlines()[-1]}[/red]", highlight=False
            )


# -- datasets -------------------------------------------------------------------------------
@app.command()
def datasets(config: ConfigOpt = None, json_out: JsonOpt = False) -> None:
    """List dataset versions (content hashes of ingested records)."""
    from rich.table import Table

    try:
        rows = _store(config).list_dataset_versions()
    except LooplineError as err:
        fail(err)
    if json_out:
        print_json([r.to_dict() for r in rows])
        return
    table = Table("version", "name", "records", "source", "created")
    for r in rows:
        table.add_row(r.version[:12], r.name, str(r.n_records), r.source_uri, _when(r.created_at))
    console.print(table)


@app.command()
def audit(
    config: ConfigOpt = None,
    limit: Annotated[int, typer.Option(help="How many, newest first.")] = 50,
    json_out: JsonOpt = False,
) -> None:
    """Show the audit log: who registered, aliased or resumed what, and when."""
    from rich.table import Table

    try:
        events = _store(config).audit_log(limit)
    except LooplineError as err:
        fail(err)
    if json_out:
        print_json([e.to_dict() for e in events])
        return
    table = Table("when", "actor", "action", "subject", "details")
    for e in events:
        table.add_row(_when(e.at), e.actor, e.action, e.subject, str(e.details or ""))
    console.print(table)


# -- models -----------------------------------------------------------------------------------
@models_app.callback(invoke_without_command=True)
def models_list(ctx: typer.Context, config: ConfigOpt = None, json_out: JsonOpt = False) -> None:
    """List registered model versions with their aliases and headline metrics."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.table import Table

    try:
        store = _store(config)
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


@models_app.command("show")
def models_show(
    ref: Annotated[str, typer.Argument(help="NAME, NAME:VERSION or NAME@ALIAS.")],
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Show one model version: metrics per class and segment, bundle and lineage."""
    try:
        store = _store(config)
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


@models_app.command("alias")
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
        _store(config).set_alias(name, alias, version, actor=os.environ.get("USER", "cli"))
    except LooplineError as err:
        fail(err)
    console.print(f"{name}@{alias} -> {name}:{version}")


@models_app.command("export")
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
        cfg = _config(config)
        mv = _store(config).resolve_model(ref)
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


@app.command("evaluate")
def evaluate_cmd(
    ref: Annotated[str, typer.Argument(help="NAME, NAME:VERSION or NAME@ALIAS.")],
    config: ConfigOpt = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config key, e.g. --set data.source.uri=other"),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Score a registered model on the configured data source, overall and per segment.

    Every valid record of the source is used (no split), so this measures a model on data
    it was not built from: e.g. a model trained on `day` images, on fog and night images.
    """
    from rich.table import Table

    from loopline.builder.evaluate import evaluate_registered
    from loopline.builder.pipeline import open_stores
    from loopline.builder.resources import BuildResources
    from loopline.cli.output import RichReporter

    try:
        cfg = _config(config, set_)
        store, artifacts = open_stores(cfg)
        with RichReporter(quiet=True) as reporter:
            report = evaluate_registered(BuildResources(cfg, store, artifacts), ref, reporter)
    except LooplineError as err:
        fail(err)
    if json_out:
        print_json(report)
        return
    console.print(
        f"{report['model']} on {report['n']} images "
        f"(dataset {report['dataset_version'][:12]}): accuracy "
        f"{report['accuracy']:.4f}, macro-F1 {report['macro_f1']:.4f}"
    )
    for column, values in report["segments"].items():
        table = Table(column, "images", "accuracy", "macro-F1")
        for value, r in values.items():
            table.add_row(value, str(r["n"]), f"{r['accuracy']:.3f}", f"{r['macro_f1']:.3f}")
        console.print(table)


serve_command.register(app)


def run() -> None:
    """Console-script entry point."""
    try:
        app()
    except LooplineError as err:  # pragma: no cover - commands map their own errors
        err_console.print(f"[red]error:[/red] {err}")
        sys.exit(err.exit_code)


if __name__ == "__main__":
    run()

"""``loopline metrics`` and ``loopline predictions``: what production answered and how
well, read from the prediction log joined with its feedback (thin shells over
``loopline.monitor.performance`` and ``store.predictions``)."""

from __future__ import annotations

import json
import os
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from loopline.cli.common import ConfigOpt, JsonOpt, fail, load_config
from loopline.cli.durations import parse_duration
from loopline.cli.output import cell, console, escape, print_json
from loopline.errors import ConfigError, LooplineError, NotFound

if TYPE_CHECKING:
    from loopline.drivers.metadata.store import MetadataStore

DEFAULT_ROWS = 1000
COLUMNS = ("id", "at", "model_version", "variant", "deployment_generation", "camera_id",
           "predicted", "confidence", "actual", "correct", "labelled_at", "probabilities",
           "request_metadata", "input_stats")  # fmt: skip

NameArg = Annotated[str, typer.Argument(help="Model NAME.")]
EnvOpt = Annotated[str, typer.Option("--env", help="Environment.")]


def _open(config: Path | None, env: str) -> MetadataStore:
    from loopline.drivers.metadata.store import MetadataStore

    cfg = load_config(config, project=True)
    cfg.environment(env)
    return MetadataStore(cfg.metadata_url())


def _known_model(store: MetadataStore, name: str) -> None:
    if not store.models.versions(name, include_archived=True):
        raise NotFound(f"no model {name!r} in the registry (see `loopline models`)")


def metrics(
    name: NameArg,
    env: EnvOpt = "production",
    window: Annotated[
        int, typer.Option("--window", help="The newest N labelled predictions per version.")
    ] = 200,
    by: Annotated[
        str | None,
        typer.Option(
            "--by", help="Also per value of a segment: camera_id or a request-metadata key."
        ),
    ] = None,  # fmt: skip
    version: Annotated[int | None, typer.Option("--version", help="Only this version.")] = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Production accuracy, macro precision/recall/F1 per version (and segment).

    Scored over the newest labelled predictions (the log joined with its feedback);
    shadow answers and answers to requests that named their version are left out.
    """
    from loopline.monitor.performance import current_metrics

    try:
        store = _open(config, env)
        _known_model(store, name)
        result = current_metrics(
            store, name, environment=env, window=window, by=by, version=version
        )
    except LooplineError as err:
        fail(err)
    if json_out:
        print_json(result)
        return
    if not result["rows"]:
        console.print(escape(f"no labelled predictions of {name} in {env} yet"))
        return
    from rich.table import Table

    table = Table("version", "scope", "labelled", "accuracy", "macro P", "macro R", "macro F1",
                  "last label", title=f"{name} in {env}, newest {window} labelled")  # fmt: skip
    for r in result["rows"]:
        table.add_row(
            str(r["version"]),
            cell(r["scope"]),
            str(r["n"]),
            f"{r['accuracy']:.3f}",
            f"{r['macro_precision']:.3f}",
            f"{r['macro_recall']:.3f}",
            f"{r['macro_f1']:.3f}",
            cell(r["last_label_at"][:19].replace("T", " ")),
        )
    console.print(table)


def predictions(
    name: NameArg,
    env: EnvOpt = "production",
    since: Annotated[
        str | None, typer.Option("--since", help="Only answers of the last 30s, 5m, 1h, 2d...")
    ] = None,
    labelled: Annotated[
        bool, typer.Option("--labelled", help="Only answers that have a label.")
    ] = False,
    limit: Annotated[
        int | None,
        typer.Option(
            "--limit",
            help=f"At most the newest N (default {DEFAULT_ROWS} shown, all written with --out).",
        ),
    ] = None,  # fmt: skip
    out: Annotated[
        Path | None, typer.Option("--out", help="Write a Parquet file (all or nothing).")
    ] = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """The prediction log joined with its feedback, oldest first.

    Every answer of the environment: variant (stable, canary, shadow, addressed),
    camera, predicted label and confidence, and the ground-truth label once it came.
    """
    try:
        if json_out and out is not None:
            raise ConfigError("give --json or --out, not both")
        if limit is not None and limit < 1:
            raise ConfigError(f"--limit {limit} is too small; give 1 or more")
        if out is not None and out.is_dir():
            raise ConfigError(f"--out {out} is a folder; give a file such as log.parquet")
        start = None
        if since is not None:
            start = datetime.now(UTC) - timedelta(seconds=parse_duration(since, "--since"))
        store = _open(config, env)
        _known_model(store, name)
        rows = store.predictions.with_feedback(
            env, name, since=start, labelled=labelled,
            limit=limit if limit is not None or out is not None else DEFAULT_ROWS,
        )  # fmt: skip
        rows = [_row(r) for r in rows]
        if out is not None:
            _write_parquet(rows, out)
    except LooplineError as err:
        fail(err)
    if out is not None:
        if json_out:
            return
        console.print(escape(f"wrote {len(rows)} predictions of {name} in {env} to {out}"))
        return
    if json_out:
        print_json(rows)
        return
    _print_table(rows, name, env)


def _row(r: dict[str, Any]) -> dict[str, Any]:
    from loopline.clock import utc as as_utc

    actual = r["actual"]
    return {
        "id": r["id"],
        "at": as_utc(r["at"]).isoformat(),
        "model_version": r["model_version"],
        "variant": r["variant"],
        "deployment_generation": r["deployment_generation"],
        "camera_id": r["camera_id"],
        "predicted": r["predicted"],
        "confidence": r["confidence"],
        "actual": actual,
        "correct": None if actual is None else actual == r["predicted"],
        "labelled_at": None if r["labelled_at"] is None else as_utc(r["labelled_at"]).isoformat(),
        "probabilities": r["probabilities"],
        "request_metadata": r["request_metadata"],
        "input_stats": r["input_stats"],
    }


def _write_parquet(rows: list[dict[str, Any]], out: Path) -> None:
    """All rows or nothing: a temporary file in the same folder, renamed over ``out``."""
    import pandas as pd

    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    for col in ("at", "labelled_at"):
        frame[col] = pd.to_datetime(frame[col], utc=True, format="ISO8601")
    for col in ("request_metadata", "input_stats"):  # free-form: kept as JSON text
        frame[col] = [None if v is None else json.dumps(v, sort_keys=True) for v in frame[col]]
    frame["correct"] = frame["correct"].astype("boolean")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        frame.to_parquet(tmp, index=False)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _print_table(rows: list[dict[str, Any]], name: str, env: str) -> None:
    if not rows:
        console.print(escape(f"no predictions of {name} in {env} match"))
        return
    from rich.table import Table

    table = Table("at", "id", "version", "variant", "camera", "predicted", "conf", "actual",
                  title=f"{name} in {env}: {len(rows)} predictions")  # fmt: skip
    for r in rows:
        mark = "" if r["correct"] is None else (" ✔" if r["correct"] else " ✘")
        table.add_row(
            cell(r["at"][:23].replace("T", " ")),
            cell(r["id"]),
            str(r["model_version"]),
            cell(r["variant"] or "-"),
            cell(r["camera_id"] or "-"),
            cell(r["predicted"]),
            f"{r['confidence']:.2f}",
            cell("-" if r["actual"] is None else f"{r['actual']}{mark}"),
        )
    console.print(table)


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.command()(metrics)
    app.command()(predictions)

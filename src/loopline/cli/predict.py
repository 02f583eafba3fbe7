"""``loopline predict``: bulk inference over a lake or a warehouse query, to Parquet."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape

from loopline.cli.common import ConfigOpt, JsonOpt, fail
from loopline.cli.output import console, print_error, print_json
from loopline.errors import ConfigError, LooplineError

if TYPE_CHECKING:
    from loopline.deploy.bulk import BulkSummary

EVERY_HELP = (
    "Run again on this schedule (30s, 5m, 1h, 1d, 1h30m) until interrupted; each run writes "
    "OUT with its scheduled UTC time before the suffix, e.g. out-20260102T030405Z.parquet, "
    "and resolves MODEL again (NAME@ALIAS follows the alias)."
)


def predict(
    model: Annotated[
        str, typer.Argument(help="NAME, NAME:VERSION or NAME@ALIAS, or a bundle folder or tar.")
    ],
    source: Annotated[
        str,
        typer.Option(
            "--source",
            help="A lake folder or URL, or a loopline.yaml whose data.source (lake or "
            "warehouse query) and data.filter are used.",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Parquet file to write (all or nothing).")],
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per model run.")] = 64,
    limit: Annotated[
        int | None, typer.Option("--limit", help="Predict only the first N records.")
    ] = None,
    every: Annotated[str | None, typer.Option("--every", help=EVERY_HELP)] = None,
    runs: Annotated[
        int | None, typer.Option("--runs", help="With --every: stop after N runs.")
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            help="Decoding processes (0: decode in a thread; default: 0 on 2 cores, else one per "
            "core less one for runs of 16 batches or more).",
        ),
    ] = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Predict every record of a data source with a model; write the rows to Parquet.

    Rows: path, sha256, predicted label, confidence, one prob_<label> per class, the true
    label when the source has one, model name and version, and the source's metadata.
    Images that cannot be read or decoded are skipped and counted by reason.
    """
    from loopline.deploy.schedule import parse_every, run_every, timestamped_path

    def once(target: Path) -> BulkSummary:
        return _run(model, source, target, config, batch_size, limit, workers, json_out)

    try:
        if runs is not None and (every is None or runs < 1):
            raise ConfigError("--runs needs --every and a count of 1 or more")
        if every is None:
            summary = once(out)
            if json_out:
                print_json(summary.to_dict())
            else:
                _show(summary)
            return
        interval = parse_every(every)
    except LooplineError as err:
        fail(err)

    def job(run: int, when: Any) -> None:
        summary = once(timestamped_path(out, when))
        if json_out:  # one JSON object per line, one line per run
            sys.stdout.write(json.dumps(summary.to_dict(), default=str) + "\n")
            sys.stdout.flush()
        else:
            _show(summary, run)

    def on_error(run: int, err: LooplineError) -> None:
        if run == 1:  # a mistake in the command: say so once, do not retry it forever
            raise err
        print_error(err)

    done = 0
    try:
        done = run_every(interval, job, max_runs=runs, on_error=on_error)
    except LooplineError as err:
        fail(err)
    except KeyboardInterrupt:
        if not json_out:
            console.print("stopped")
        return
    if not json_out:
        console.print(f"done: {done} run(s)")


def _run(
    model: str,
    source: str,
    out: Path,
    config: Path | None,
    batch_size: int,
    limit: int | None,
    workers: int | None,
    quiet: bool,
) -> BulkSummary:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from loopline.deploy.bulk import predict_source

    bar = Progress(
        TextColumn("[cyan]predicting"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=quiet or not console.is_terminal,
    )
    task = bar.add_task("predict", total=None)

    def progress(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total)

    with bar:
        return predict_source(
            model,
            source,
            out,
            config=config,
            batch_size=batch_size,
            limit=limit,
            workers=workers,
            progress=progress,
        )


def _show(s: BulkSummary, run: int | None = None) -> None:
    prefix = f"run {run}: " if run is not None else ""
    model = f"{s.model}:{s.version}" if s.version else f"{s.model} (a bundle not registered)"
    say = console.print
    say(
        escape(
            f"{prefix}predicted {s.rows} of {s.records} records with {model} in "
            f"{s.seconds:.1f} s ({s.images_per_s:.0f} images/s) -> {s.out}"
        ),
        highlight=False,
        soft_wrap=True,
    )
    if s.failed:
        reasons = ", ".join(f"{r} {n}" for r, n in s.failed_by_reason.items())
        say(escape(f"skipped {s.failed}: {reasons}"), style="yellow", highlight=False)
        for f in s.failures[:3]:
            say(
                escape(f"  {f['path']}: {f['error']}"), style="dim", highlight=False, soft_wrap=True
            )
    if s.accuracy is not None:
        say(f"accuracy {s.accuracy:.3f} on {s.labelled} labelled records", highlight=False)

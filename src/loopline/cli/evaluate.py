"""``loopline evaluate``: score a registered model on the configured data source."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape

from loopline.cli.common import ConfigOpt, JsonOpt, fail, load_config
from loopline.cli.output import cell, console, print_json
from loopline.errors import LooplineError


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

    from loopline.builder.evaluate_registered import evaluate_registered
    from loopline.builder.pipeline import open_stores
    from loopline.builder.resources import BuildResources
    from loopline.cli.output import RichReporter

    try:
        cfg = load_config(config, set_, project=True)
        store, artifacts = open_stores(cfg)
        with RichReporter(quiet=True) as reporter:
            report = evaluate_registered(BuildResources(cfg, store, artifacts), ref, reporter)
    except LooplineError as err:
        fail(err)
    if json_out:
        print_json(report)
        return
    console.print(
        f"{escape(report['model'])} on {report['n']} images "
        f"(dataset {report['dataset_version'][:12]}): accuracy "
        f"{report['accuracy']:.4f}, macro-F1 {report['macro_f1']:.4f}"
    )
    for column, values in report["segments"].items():
        table = Table(escape(column), "images", "accuracy", "macro-F1")
        for value, r in values.items():
            table.add_row(cell(value), str(r["n"]), f"{r['accuracy']:.3f}", f"{r['macro_f1']:.3f}")
        console.print(table)

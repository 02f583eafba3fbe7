"""``loopline init`` and ``loopline datagen``: start a project and its example lake."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from loopline.cli.common import JsonOpt, fail
from loopline.cli.output import console, err_console, print_json
from loopline.errors import LooplineError


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
    console.print(escape(f"wrote {target}; next: loopline datagen && loopline build"))


def datagen(
    out: Annotated[Path, typer.Option(help="Folder of the lake to write.")] = Path("lake"),
    images: Annotated[int, typer.Option(help="Number of images.")] = 5000,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same lake).")] = 0,
    conditions: Annotated[
        str, typer.Option(help="Comma-separated: day,night,fog,rain.")
    ] = "day,night,fog,rain",
    cameras: Annotated[int, typer.Option(help="Number of cameras.")] = 4,
    force: Annotated[
        bool, typer.Option("--force", help="Replace a lake already in --out (its images too).")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Write a synthetic highway-CCTV data lake (images + manifest.csv) for the example.

    A lake already in --out is left alone (exit 1) unless --force replaces it.
    """
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
                overwrite=force,
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
        defects = ", ".join(f"{k} {v}" for k, v in summary.defects.items())
        console.print(
            escape(f"wrote {summary.images} images to {summary.out} ({defects} defects on purpose)")
        )

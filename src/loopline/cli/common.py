"""What every command shares: the config and store options, one-line errors, timestamps."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from loopline.cli.output import err_console
from loopline.errors import LooplineError

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="Config file (default ./loopline.yaml).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


def fail(err: LooplineError) -> NoReturn:
    err_console.print(f"[red]error:[/red] {err}", highlight=False, soft_wrap=True)
    raise typer.Exit(err.exit_code)


def load_config(path: Path | None, overrides: list[str] | None = None) -> Any:
    from loopline.config import load_config

    return load_config(path, overrides or [])


def open_store(config_path: Path | None) -> Any:
    from loopline.drivers.metadata.store import MetadataStore

    return MetadataStore(load_config(config_path).metadata_url())


def when(ts: Any) -> str:
    return ts.strftime("%Y-%m-%d %H:%M:%S") if ts else ""

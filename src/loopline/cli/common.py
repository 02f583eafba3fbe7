"""What every command shares: the config and store options, one-line errors, timestamps."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from loopline.cli.output import print_error
from loopline.errors import LooplineError

if TYPE_CHECKING:
    from loopline.config import Config
    from loopline.drivers.metadata.store import MetadataStore

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="Config file (default ./loopline.yaml).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


def fail(err: LooplineError) -> NoReturn:
    """Print ``err`` as one plain line (never read as markup) and exit with its code."""
    print_error(err)
    raise typer.Exit(err.exit_code)


def load_config(
    path: Path | None, overrides: list[str] | None = None, *, project: bool = False
) -> Config:
    """The config; with ``project``, first require that there is a project.

    Commands that read the registry pass ``project``, so that one run in the wrong folder
    says so (``loopline.config.require_project``) instead of creating ``.loopline/`` there.
    """
    from loopline.config import load_config, require_project

    if project:
        require_project(path)
    return load_config(path, overrides or [])


def open_store(config_path: Path | None) -> MetadataStore:
    """The project's metadata store; ConfigError (creating nothing) outside a project."""
    from loopline.drivers.metadata.store import MetadataStore

    return MetadataStore(load_config(config_path, project=True).metadata_url())


def when(ts: Any) -> str:
    return ts.strftime("%Y-%m-%d %H:%M:%S") if ts else ""

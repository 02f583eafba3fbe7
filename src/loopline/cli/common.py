"""What every command shares: the config and store options, one-line errors, timestamps."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from loopline.cli.output import print_error
from loopline.errors import ConfigError, LooplineError

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


def require_project(path: Path | None) -> None:
    """ConfigError unless there is a project: a config file, or a store named by LOOPLINE_DB_URL.

    Commands that read the registry call this before opening any store, so running one in
    the wrong folder says so instead of creating an empty ``.loopline/`` there.
    """
    from loopline.config import DEFAULT_CONFIG_FILE

    if path is not None or Path(DEFAULT_CONFIG_FILE).is_file() or os.environ.get("LOOPLINE_DB_URL"):
        return
    raise ConfigError(
        f"no Loopline project here: {Path.cwd()} has no {DEFAULT_CONFIG_FILE}; create one "
        "with `loopline init`, or pass --config FILE (or set LOOPLINE_DB_URL)"
    )


def load_config(
    path: Path | None, overrides: list[str] | None = None, *, project: bool = False
) -> Config:
    """The config; with ``project``, first require that there is a project (see above)."""
    from loopline.config import load_config

    if project:
        require_project(path)
    return load_config(path, overrides or [])


def open_store(config_path: Path | None) -> MetadataStore:
    """The project's metadata store; ConfigError (creating nothing) outside a project."""
    from loopline.drivers.metadata.store import MetadataStore

    return MetadataStore(load_config(config_path, project=True).metadata_url())


def when(ts: Any) -> str:
    return ts.strftime("%Y-%m-%d %H:%M:%S") if ts else ""

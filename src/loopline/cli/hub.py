"""``loopline hub --env ENV``: run the edge hub that an environment's edge agents follow."""

from __future__ import annotations

from typing import Annotated

import typer

from loopline.cli.common import ConfigOpt, fail
from loopline.errors import LooplineError


def hub(
    env: Annotated[
        list[str], typer.Option("--env", "-e", help="Edge environment to serve (repeatable).")
    ],
    config: ConfigOpt = None,
    host: Annotated[str | None, typer.Option(help="Address (default: the env's host).")] = None,
    port: Annotated[
        int | None, typer.Option(help="Port (default: environments.ENV.edge.hub_port).")
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Serve edge devices: their deployment, bundles, telemetry and prediction log.

    Telemetry and predictions go to the metadata store, over HTTP and over MQTT from the
    environment's broker.
    """
    from loopline.edge.hub import serve

    try:
        serve(config, env, host=host, port=port, log_level=log_level)
    except LooplineError as err:
        fail(err)


def register(app: typer.Typer) -> None:
    app.command()(hub)

"""``loopline serve``: run the prediction server for a registered model or a bundle.

Its command line is parsed by the server's own parser (``loopline.deploy.settings.
build_parser``, made from the settings model), so ``loopline serve`` and ``python -m
loopline.deploy.server`` take exactly the same flags. The parser is built only when the
command runs: ``loopline --help`` does not import the server's settings.
"""

from __future__ import annotations

import typer

HELP = (
    "Serve a registered model over HTTP (MODEL: NAME, NAME:VERSION or NAME@ALIAS), or a "
    "bundle with --bundle. Flags: loopline serve --help; the same as python -m "
    "loopline.deploy.server."
)


def register(app: typer.Typer) -> None:
    """Add the ``serve`` command to the ``loopline`` CLI."""

    @app.command(
        help=HELP,
        add_help_option=False,  # --help goes to the server's parser, which lists every flag
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    )
    def serve(ctx: typer.Context) -> None:
        from loopline.deploy.server import main

        raise typer.Exit(main(list(ctx.args), prog="loopline serve"))

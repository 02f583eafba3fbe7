"""``loopline serve``: run the prediction server for a registered model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from loopline.errors import LooplineError

HELP = (
    "Serve a registered model over HTTP until Ctrl-C or SIGTERM (a graceful stop loses "
    "no prediction).\n\n"
    "MODEL is NAME, NAME:VERSION or NAME@ALIAS (e.g. vehicles@production). The bundle is "
    "verified against its registered sha256 and its manifest before the model is loaded.\n\n"
    "Endpoints: Open Inference Protocol v2 under /v2 (KServe and Triton clients work as they "
    "are); JPEG/PNG images at POST /v1/models/NAME/predict; ground truth at POST /v1/feedback "
    "(needs a bearer token: set LOOPLINE_SERVE_TOKEN); Prometheus metrics at /metrics. Every "
    "prediction is logged to the metadata store.\n\n"
    "Every setting can also be set as LOOPLINE_SERVE_<SETTING>, e.g. "
    "LOOPLINE_SERVE_MAX_BATCH_SIZE=16. See docs/serving.md."
)


def register(app: typer.Typer) -> None:
    """Add the ``serve`` command to the ``loopline`` CLI."""

    @app.command(help=HELP)
    def serve(
        model: Annotated[str, typer.Argument(help="NAME, NAME:VERSION or NAME@ALIAS.")],
        config: Annotated[
            Path | None,
            typer.Option("--config", "-c", help="Config file (default ./loopline.yaml)."),
        ] = None,
        host: Annotated[
            str | None, typer.Option(help="Interface to listen on [127.0.0.1].")
        ] = None,
        port: Annotated[int | None, typer.Option(help="TCP port [8080].")] = None,
        workers: Annotated[
            int | None, typer.Option(help="Server processes sharing the port [2].")
        ] = None,
        max_batch_size: Annotated[
            int | None, typer.Option(help="Most images per model run [8].")
        ] = None,
        max_delay_ms: Annotated[
            float | None,
            typer.Option(help="Longest wait for a batch to fill under concurrent load [0]."),
        ] = None,
        inference_threads: Annotated[
            int | None,
            typer.Option(help="Batcher threads per process [1 with several workers, else 2]."),
        ] = None,
        intra_op_threads: Annotated[
            int | None, typer.Option(help="ONNX Runtime threads per operator [1].")
        ] = None,
        inter_op_threads: Annotated[
            int | None, typer.Option(help="ONNX Runtime threads across operators [1].")
        ] = None,
        max_body_bytes: Annotated[
            int | None, typer.Option(help="Largest request body accepted [8 MiB].")
        ] = None,
        token_file: Annotated[
            Path | None,
            typer.Option(help="File with the bearer token(s) (else LOOPLINE_SERVE_TOKEN)."),
        ] = None,
        require_token_for_predict: Annotated[
            bool, typer.Option(help="Also require the token on predict and infer.")
        ] = False,
        log: Annotated[
            bool, typer.Option("--log/--no-log", help="Log every prediction to the store.")
        ] = True,
        log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    ) -> None:
        from loopline.deploy.server import ModelSource, make_settings
        from loopline.deploy.server import serve as run_server

        options = {
            "host": host,
            "port": port,
            "workers": workers,
            "max_batch_size": max_batch_size,
            "max_delay_ms": max_delay_ms,
            "inference_threads": inference_threads,
            "intra_op_threads": intra_op_threads,
            "inter_op_threads": inter_op_threads,
            "max_body_bytes": max_body_bytes,
            "require_token_for_predict": require_token_for_predict or None,
            "log_predictions": None if log else False,
        }
        try:
            settings = make_settings(options, token_file)
            run_server(ModelSource(ref=model, config=config), settings, log_level=log_level)
        except LooplineError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(err.exit_code) from None

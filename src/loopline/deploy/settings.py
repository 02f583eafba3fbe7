"""How a prediction server runs: batching, threads, limits, tokens and the prediction log.

Every field can be set by a flag or by an environment variable named
``LOOPLINE_SERVE_<FIELD>`` (for example ``LOOPLINE_SERVE_MAX_BATCH_SIZE=16``). The token
also comes from ``LOOPLINE_SERVE_TOKEN`` (several tokens, comma-separated, for rotation).
Defaults suit a small machine with 2 cores.

``serve_flags`` derives the command-line flags from the fields and ``build_parser`` turns
them into one argparse parser, which both ``loopline serve`` and ``python -m
loopline.deploy.server`` use (argparse: the serving image has no Typer), so the two take
exactly the same flags.
"""

from __future__ import annotations

import argparse
import os
import textwrap
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from loopline.errors import ConfigError
from loopline.images import DEFAULT_MAX_PIXELS, PILLOW_MAX_PIXELS

ENV_PREFIX = "LOOPLINE_SERVE_"
MiB = 1024 * 1024


class ServeSettings(BaseModel):
    """Settings of one prediction server."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field("127.0.0.1", description="interface to listen on")
    port: int = Field(8080, ge=0, le=65535, description="TCP port")
    # Two processes, one batcher thread each, is the measured best on 2 cores: HTTP parsing,
    # decoding and inference of one process never wait on the other's GIL.
    workers: int = Field(2, ge=1, le=64, description="server processes sharing the port")

    # Dynamic batching: requests waiting while the model runs form the next batch.
    # Small batches suit CPUs: one ONNX Runtime thread per batch gains nothing from large
    # batches, and requests that arrive while a batch runs form the next one by themselves.
    max_batch_size: int = Field(8, ge=1, le=1024, description="most images per model run")
    max_delay_ms: float = Field(
        0.0,
        ge=0.0,
        le=1000.0,
        description="how long a batch may wait for more requests once traffic is concurrent "
        "(0: take what is waiting); a lone request never waits",
    )
    max_queue: int = Field(2048, ge=1, description="requests waiting at most; beyond that 503")
    max_queue_bytes: int = Field(
        256 * MiB,
        ge=1024,
        description="bytes of images and tensors waiting at most, per process; beyond that 503",
    )
    inference_threads: int = Field(
        0,
        ge=0,
        le=64,
        description="batcher threads per process, each decoding and running one batch "
        "(0: 1 per process when workers > 1, else 2)",
    )
    intra_op_threads: int = Field(1, ge=0, description="ONNX Runtime threads per operator")
    inter_op_threads: int = Field(1, ge=0, description="ONNX Runtime threads across operators")

    # Limits on what a client may send.
    max_body_bytes: int = Field(8 * MiB, ge=1024, description="largest request body (413)")
    max_image_pixels: int = Field(
        DEFAULT_MAX_PIXELS,
        ge=1,
        le=PILLOW_MAX_PIXELS,
        description="most pixels an image may declare in its header (413); "
        "the default, 4096x4096, fits a 4K frame",
    )
    max_images_per_request: int = Field(64, ge=1, description="images or tensor rows (413)")
    max_metadata_keys: int = Field(32, ge=0, description="metadata values per request")

    # Security: a token is required on every endpoint that writes (feedback, admin).
    token: SecretStr | None = Field(None, description="bearer token(s), comma-separated")
    require_token_for_predict: bool = Field(
        False, description="also require the token on predict and infer"
    )

    # Prediction log.
    log_predictions: bool = Field(True, description="log every prediction to the store")
    log_probabilities: bool = Field(True, description="keep the class probabilities in the log")
    flush_interval_s: float = Field(
        1.0, gt=0.0, le=3600.0, description="how often the prediction log is written"
    )
    flush_max_rows: int = Field(5000, ge=1, description="rows per write at most")
    max_pending_rows: int = Field(
        1_000_000, ge=1000, description="rows kept in memory while the store is down"
    )
    log_write_attempts: int = Field(
        5, ge=1, le=100, description="tries of one batch of rows before it goes to the spill file"
    )
    spill_dir: Path | None = Field(
        None, description="where unwritten rows wait for re-import (default: working directory)"
    )
    metadata_url: str | None = Field(None, description="where the log goes; default: the project's")

    # Production capture (deploy/capture.py): request images kept, off the request path.
    capture: bool = Field(False, description="keep sampled request images for retraining")
    capture_sample_rate: float = Field(1.0, ge=0.0, le=1.0, description="share of images kept")
    capture_max_image_bytes: int = Field(MiB, ge=1, description="larger images are not kept")
    capture_retention_days: float = Field(
        30.0, gt=0.0, description="days a capture is kept unless a dataset version uses it"
    )
    capture_queue: int = Field(
        1024, ge=1, description="images waiting to be stored at most (then dropped, counted)"
    )
    capture_queue_bytes: int = Field(
        64 * MiB, ge=1024, description="bytes of images waiting to be stored at most"
    )
    capture_max_total_bytes: int | None = Field(
        None, ge=1, description="captures beyond this are deleted, oldest first (no cap: None)"
    )
    capture_purge_interval_s: float = Field(
        3600.0,
        ge=0.0,
        description="how often the server deletes captures past retention or over the cap "
        "(0: never; `loopline capture purge` does it by hand)",
    )
    capture_read_token: SecretStr | None = Field(
        None,
        description="bearer token(s), comma-separated, that alone may read captured images "
        "(default: the server's tokens)",
    )
    artifacts_url: str | None = Field(
        None, description="where captured images go; default: the project's artifact store"
    )

    @model_validator(mode="after")
    def _auto_threads(self) -> ServeSettings:
        if self.inference_threads == 0:
            self.inference_threads = 1 if self.workers > 1 else 2
        return self

    def tokens(self) -> list[str]:
        return _split_tokens(self.token)

    def capture_read_tokens(self) -> list[str]:
        """The tokens that may read captured images, when a separate scope is set."""
        return _split_tokens(self.capture_read_token)

    def to_env(self) -> dict[str, str]:
        """This object as ``LOOPLINE_SERVE_*`` variables (how worker processes receive it)."""
        out: dict[str, str] = {}
        for name, value in self.model_dump().items():
            if value is None:
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            out[ENV_PREFIX + name.upper()] = (
                str(value).lower() if isinstance(value, bool) else str(value)
            )
        return out


def _split_tokens(secret: SecretStr | None) -> list[str]:
    raw = secret.get_secret_value() if secret is not None else ""
    return [t.strip() for t in raw.split(",") if t.strip()]


def load_settings(
    overrides: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    base: dict[str, Any] | None = None,
) -> ServeSettings:
    """Settings from ``base`` (an environment's, in ``loopline.yaml``), then
    ``LOOPLINE_SERVE_*`` variables, then ``overrides`` (flags) on top."""
    env = dict(os.environ) if env is None else env
    data: dict[str, Any] = dict(base or {})
    for name in ServeSettings.model_fields:
        key = ENV_PREFIX + name.upper()
        if key in env and env[key] != "":
            data[name] = env[key]
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return ServeSettings.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"serve setting {where}: {first['msg']}") from None


# -- command-line flags ------------------------------------------------------------------------
@dataclass(frozen=True)
class Flag:
    """One command-line flag of the server: ``dest`` is the setting (or option) it sets.

    A boolean flag also has its negative form, ``--no-...``. A flag's value is None when it
    is not given, so that the environment and then the defaults apply.
    """

    dest: str
    names: tuple[str, ...]
    type: type
    help: str
    choices: tuple[str, ...] = ()
    default: Any = None
    setting: bool = True

    @property
    def metavar(self) -> str:
        return _METAVARS.get(self.type, "TEXT")


# Flag names that differ from the field name (kept short where users type them).
_FLAG_NAMES = {"log_predictions": "log"}
# Not on the command line: a secret in argv is visible to every user of the machine.
_NO_FLAG = frozenset({"token", "capture_read_token"})
LOG_LEVELS = ("debug", "info", "warning", "error")
_METAVARS: dict[type, str] = {int: "INT", float: "FLOAT", Path: "PATH"}

# What is served and how the process runs: the same for both commands.
SOURCE_FLAGS = (
    Flag("bundle", ("--bundle",), Path, "an extracted bundle folder or a bundle tar, "
         "instead of MODEL", setting=False),
    Flag("env", ("--env",), str, "serve an environment of loopline.yaml instead of MODEL: "
         "whatever its deployment in the store says, followed as it changes", setting=False),
    Flag("config", ("--config", "-c"), Path, "config file (default ./loopline.yaml)",
         setting=False),
    Flag("model_name", ("--model-name",), str, "name of a --bundle model (default: its "
         "metadata)", setting=False),
    Flag("model_version", ("--model-version",), int, "version of a --bundle model",
         setting=False),
    Flag("token_file", ("--token-file",), Path, "file with the bearer token(s) "
         "(else LOOPLINE_SERVE_TOKEN)", setting=False),
    Flag("log_level", ("--log-level",), str, "log level", choices=LOG_LEVELS, default="info",
         setting=False),
)  # fmt: skip


def _base_type(annotation: Any) -> type:
    """int for ``int``, Path for ``Path | None``: the type a flag's value is parsed as."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = args[0]
    return annotation if isinstance(annotation, type) else str


def serve_flags() -> list[Flag]:
    """Every flag of the server's two commands: the source flags, then one per setting."""
    flags = list(SOURCE_FLAGS)
    for name, field in ServeSettings.model_fields.items():
        if name in _NO_FLAG:
            continue
        kind = _base_type(field.annotation)
        flag = "--" + _FLAG_NAMES.get(name, name).replace("_", "-")
        default = field.default
        help_text = field.description or name.replace("_", " ")
        if default is not None and kind is not bool:
            help_text += f" [{default}]"
        flags.append(Flag(name, (flag,), kind, help_text))
    return flags


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The server's command line: ``[MODEL]`` and every flag of ``serve_flags``."""
    paragraphs = [textwrap.fill(par, 79) for par in description.split("\n\n")]
    p = argparse.ArgumentParser(
        prog=prog,
        description="\n\n".join(paragraphs),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # a flag is spelt out, as click wants it
    )
    p.add_argument("model", nargs="?", metavar="MODEL",
                   help="a registered model: NAME, NAME:VERSION or NAME@ALIAS")  # fmt: skip
    for flag in serve_flags():
        if flag.type is bool:  # --x and --no-x
            p.add_argument(*flag.names, dest=flag.dest, action=argparse.BooleanOptionalAction,
                           default=None, help=flag.help)  # fmt: skip
        else:
            p.add_argument(*flag.names, dest=flag.dest, type=flag.type, help=flag.help,
                           choices=flag.choices or None, default=flag.default,
                           metavar=None if flag.choices else flag.metavar)  # fmt: skip
    return p


def setting_options(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given on the command line (None where a flag was not given)."""
    return {f.dest: getattr(args, f.dest) for f in serve_flags() if f.setting}

"""How a prediction server runs: batching, threads, limits, tokens and the prediction log.

Every field can be set by a flag of ``loopline serve`` or by an environment variable named
``LOOPLINE_SERVE_<FIELD>`` (for example ``LOOPLINE_SERVE_MAX_BATCH_SIZE=16``). The token
also comes from ``LOOPLINE_SERVE_TOKEN`` (several tokens, comma-separated, for rotation).
Defaults suit a small machine with 2 cores.
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from loopline.errors import ConfigError

ENV_PREFIX = "LOOPLINE_SERVE_"


class ServeSettings(BaseModel):
    """Settings of one prediction server."""

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    # Two processes, one batcher thread each, is the measured best on 2 cores: HTTP parsing,
    # decoding and inference of one process never wait on the other's GIL.
    workers: int = Field(2, ge=1, le=64, description="server processes sharing the port")

    # Dynamic batching: requests waiting while the model runs form the next batch.
    # Small batches suit CPUs: one ONNX Runtime thread per batch gains nothing from large
    # batches, and requests that arrive while a batch runs form the next one by themselves.
    max_batch_size: int = Field(8, ge=1, le=1024)
    max_delay_ms: float = Field(
        0.0,
        ge=0.0,
        le=1000.0,
        description="how long a batch may wait for more requests once traffic is concurrent "
        "(0: take what is waiting); a lone request never waits",
    )
    max_queue: int = Field(2048, ge=1, description="images waiting at most; beyond that 503")
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
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    max_images_per_request: int = Field(64, ge=1)
    max_metadata_keys: int = Field(32, ge=0)

    # Security: a token is required on every endpoint that writes (feedback, admin).
    token: SecretStr | None = Field(None, description="bearer token(s), comma-separated")
    require_token_for_predict: bool = False

    # Prediction log.
    log_predictions: bool = True
    log_probabilities: bool = True
    flush_interval_s: float = Field(1.0, gt=0.0, le=3600.0)
    flush_max_rows: int = Field(5000, ge=1)
    max_pending_rows: int = Field(
        1_000_000, ge=1000, description="rows kept while the store is down"
    )
    metadata_url: str | None = Field(None, description="where the log goes; default: the project's")

    @model_validator(mode="after")
    def _auto_threads(self) -> ServeSettings:
        if self.inference_threads == 0:
            self.inference_threads = 1 if self.workers > 1 else 2
        return self

    def tokens(self) -> list[str]:
        raw = self.token.get_secret_value() if self.token is not None else ""
        return [t.strip() for t in raw.split(",") if t.strip()]

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


def load_settings(
    overrides: dict[str, Any] | None = None, env: dict[str, str] | None = None
) -> ServeSettings:
    """Settings from ``LOOPLINE_SERVE_*`` variables, then ``overrides`` (flags) on top."""
    env = dict(os.environ) if env is None else env
    data: dict[str, Any] = {}
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

"""What the hub accepts from devices, checked field by field (pydantic).

The same ``Report`` arrives over HTTP and over MQTT; prediction rows only over HTTP. Every
field has a bound, so a device cannot write an unbounded row into the metadata store.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from loopline.edge import protocol

_ID = r"^[A-Za-z0-9_-]{1,32}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _aware(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Sample(_Strict):
    """One telemetry sample: when, which version ran, and the metrics."""

    at: datetime | None = None
    version: int | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)

    @field_validator("at")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        return _aware(value) if value is not None else None


class Report(_Strict):
    """A device's heartbeat with its telemetry."""

    device_id: str = Field(max_length=200)
    status: str = Field(min_length=1, max_length=16)
    model_name: str | None = Field(None, max_length=200)
    version: int | None = None
    generation: int | None = Field(None, ge=0)
    bundle_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    host: str | None = Field(None, max_length=200)
    error: str | None = Field(None, max_length=4000)
    info: dict[str, Any] = Field(default_factory=dict)
    telemetry: dict[str, Any] = Field(default_factory=dict)
    samples: list[Sample] = Field(default_factory=list, max_length=1000)

    @field_validator("device_id")
    @classmethod
    def _device_id(cls, value: str) -> str:
        return protocol.check_device_id(value)


class PredictionRow(_Strict):
    """One prediction the device made, as it logged it."""

    id: str = Field(pattern=_ID)
    at: datetime
    model_name: str = Field(max_length=200)
    model_version: int
    source: str = Field("edge", max_length=20)
    label: str = Field(max_length=200)
    confidence: float = Field(ge=0.0, le=1.0)
    probabilities: list[float] | None = Field(None, max_length=10_000)
    request_metadata: dict[str, Any] | None = None
    input_stats: dict[str, Any] | None = None
    generation: int | None = Field(None, ge=0)

    @field_validator("at")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        return _aware(value)


class PredictionUpload(_Strict):
    device_id: str = Field(max_length=200)
    rows: list[PredictionRow] = Field(max_length=protocol.MAX_ROWS_PER_UPLOAD)

    @field_validator("device_id")
    @classmethod
    def _device_id(cls, value: str) -> str:
        return protocol.check_device_id(value)


def prediction_rows(env: str, upload: PredictionUpload) -> list[dict[str, Any]]:
    """The ``predictions`` rows of an upload: the environment, the device in the request
    metadata, and the camera as its own column."""
    out = []
    for r in upload.rows:
        meta = {str(k): v for k, v in (r.request_metadata or {}).items()}
        meta["device_id"] = upload.device_id
        camera = meta.get("camera_id")
        out.append(
            {
                "id": r.id,
                "at": r.at,
                "model_name": r.model_name,
                "model_version": r.model_version,
                "source": r.source,
                "label": r.label,
                "confidence": r.confidence,
                "probabilities": r.probabilities,
                "request_metadata": meta,
                "input_stats": r.input_stats,
                "environment": env,
                "deployment_generation": r.generation,
                "variant": "stable",
                "camera_id": str(camera)[:200] if camera is not None else None,
            }
        )
    return out

"""What a running server holds, shared by its endpoints: model, batcher, log, metrics, auth."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from loopline.deploy.auth import BearerAuth
from loopline.deploy.limits import RequestRejected
from loopline.deploy.metrics import ServerMetrics
from loopline.deploy.predlog import PredictionLog
from loopline.deploy.runtime import Batcher, ServedModel
from loopline.deploy.settings import ServeSettings
from loopline.errors import NotFound

if TYPE_CHECKING:
    from loopline.drivers.metadata.store import MetadataStore

MAX_KEY = 64
MAX_VALUE = 1024


@dataclass
class ServerState:
    served: ServedModel
    settings: ServeSettings
    batcher: Batcher
    metrics: ServerMetrics
    auth: BearerAuth
    predlog: PredictionLog | None
    store: MetadataStore | None  # None when the prediction log is off
    ready: bool = False

    def check_model(self, path_params: dict[str, Any]) -> None:
        """404 unless the path names the served model (and, if given, its version)."""
        name = path_params.get("name")
        served = self.served
        if name != served.name:
            raise NotFound(
                f"model {name!r} is not served here; this server serves {served.name!r} "
                f"version {served.version}"
            )
        version = path_params.get("version")
        if version is not None and version != str(served.version):
            raise NotFound(
                f"model {name!r} has no version {version!r} here; this server serves "
                f"version {served.version}"
            )

    def check_metadata(self, items: Any) -> dict[str, Any] | None:
        """Request metadata kept with each prediction: a few short scalar values.

        ``captured_at``, when given, must be an ISO 8601 time, so the Monitor can use it.
        """
        if not items:
            return None
        limit = self.settings.max_metadata_keys
        if len(items) > limit:
            raise RequestRejected(f"too much metadata: {len(items)} keys, at most {limit}")
        out: dict[str, Any] = {}
        for key, value in items.items():
            if not isinstance(key, str) or not 0 < len(key) <= MAX_KEY:
                raise RequestRejected(f"metadata key {key!r} must be 1 to {MAX_KEY} characters")
            if value is not None and not isinstance(value, str | int | float | bool):
                raise RequestRejected(f"metadata {key!r} must be a string, number or boolean")
            if isinstance(value, str) and len(value) > MAX_VALUE:
                raise RequestRejected(f"metadata {key!r} is longer than {MAX_VALUE} characters")
            out[key] = value
        captured = out.get("captured_at")
        if captured is not None:
            try:
                datetime.fromisoformat(str(captured).replace("Z", "+00:00"))
            except ValueError:
                raise RequestRejected(
                    f"metadata captured_at {captured!r} is not an ISO 8601 time, "
                    "e.g. 2026-11-27T08:15:00Z"
                ) from None
        return out

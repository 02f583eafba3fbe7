"""What a running server holds, shared by its endpoints: router, log, metrics, auth.

The versions it serves are the lanes of ``router.table`` (one for ``loopline serve MODEL``,
those of the environment's deployment for ``--env``); ``served`` is the stable one.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from loopline.deploy.auth import BearerAuth
from loopline.deploy.capture import NO_CAPTURE, CaptureWriter, NoCapture
from loopline.deploy.limits import RequestRejected
from loopline.deploy.metrics import ServerMetrics
from loopline.deploy.predlog import PredictionLog
from loopline.deploy.router import NotReady, Router
from loopline.deploy.runtime import Batcher, ServedModel
from loopline.deploy.settings import ServeSettings
from loopline.errors import NotFound

if TYPE_CHECKING:
    from loopline.drivers.metadata.store import MetadataStore

MAX_KEY = 64
MAX_VALUE = 1024


@dataclass
class ServerState:
    settings: ServeSettings
    router: Router
    metrics: ServerMetrics
    auth: BearerAuth
    predlog: PredictionLog | None
    store: MetadataStore | None  # None when the prediction log is off
    environment: str | None = None  # the environment served (--env), else None
    accepting: bool = False  # between start-up and shutdown
    capture: CaptureWriter | NoCapture = NO_CAPTURE  # production capture (deploy/capture.py)

    @property
    def ready(self) -> bool:
        """Accepting requests, with a version to answer them."""
        return self.accepting and self.router.table.stable is not None

    def not_ready_reason(self) -> str:
        if not self.accepting:
            return "not ready: the server is starting or stopping"
        return f"not ready: {self.router.table.reason}"

    @property
    def served(self) -> ServedModel:
        """The stable version (503 while none is loaded)."""
        table = self.router.table
        if table.stable is None:
            raise NotReady(table.reason)
        return table.stable.served

    @property
    def batcher(self) -> Batcher:
        """The stable version's batcher."""
        table = self.router.table
        if table.stable is None:
            raise NotReady(table.reason)
        return table.stable.batcher

    def served_for(self, path_params: dict[str, Any]) -> ServedModel:
        """The version a path addresses (its ``version``, else the stable one)."""
        version = path_params.get("version")
        if version is None:
            return self.served
        return self.router.table.lane(version).served

    def labels(self) -> list[str] | None:
        """Every label a loaded version may answer (None while none is loaded)."""
        lanes = self.router.table.lanes.values()
        if not lanes:
            return None
        return list(dict.fromkeys(label for lane in lanes for label in lane.served.labels))

    def check_model(self, path_params: dict[str, Any]) -> None:
        """404 unless the path names the served model (and, if given, a loaded version)."""
        table = self.router.table
        if table.stable is None:
            raise NotReady(table.reason)
        name = path_params.get("name")
        if name != table.name:
            raise NotFound(
                f"model {name!r} is not served here; this server serves {table.name!r} "
                f"{table.describe()}"
            )
        version = path_params.get("version")
        if version is not None:
            table.lane(version)

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

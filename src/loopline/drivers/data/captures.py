"""Labelled production captures as a data source: what the retrain loop trains on.

A record is one captured request image (``store.captures``) of an environment joined with
its prediction (the model that answered, when) and its feedback label; captures without a
label are left out. Columns: ``path`` (``captures/<prediction_id>``), ``label``,
``camera_id``, ``captured_at``, ``predicted_at``, ``environment``, ``model_version`` and
``sha256`` of the image. ``since``/``until`` bound the prediction time (``until``
exclusive), so a loop can hold the newest labelled captures out of training.

The bytes come from the content-addressed artifact store, which re-hashes every read; a
path that the listing does not hold is refused, whatever its name.
"""

from __future__ import annotations

import threading
import weakref
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import pandas as pd
from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from loopline.digest import sha256_bytes
from loopline.errors import DataSourceError, LooplineError, NotFound

if TYPE_CHECKING:
    from loopline.config import Config
    from loopline.drivers.artifacts import ArtifactStore
    from loopline.drivers.metadata.store import MetadataStore

PREFIX = "captures/"
COLUMNS = (
    "path",
    "label",
    "camera_id",
    "captured_at",
    "predicted_at",
    "environment",
    "model_version",
    "sha256",
)


def parse_time(value: str | datetime | None, what: str) -> datetime | None:
    """An aware UTC time from ISO-8601 (naive taken as UTC); DataSourceError if invalid."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        ts = value
    else:
        try:
            ts = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except ValueError:
            raise DataSourceError(
                f"captures source: {what} {value!r} is not an ISO-8601 time, e.g. "
                "2025-01-31T12:00:00+00:00"
            ) from None
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def _iso(ts: datetime) -> str:
    return (ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)).isoformat()


class CapturesSource:
    """Captured images of ``environment`` with their feedback labels, from a project's stores.

    ``store`` and ``artifacts`` may be given (open stores), or their URLs: then they are
    opened on first use, so building the source (a preflight) costs nothing.
    """

    def __init__(
        self,
        *,
        environment: str,
        model_name: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        store: MetadataStore | None = None,
        artifacts: ArtifactStore | None = None,
        metadata_url: str | None = None,
        artifacts_url: str | None = None,
    ) -> None:
        if not environment:
            raise DataSourceError(
                "a captures source needs environment: the environment whose captured "
                "requests it reads (e.g. production)"
            )
        if store is None and metadata_url is None:
            raise DataSourceError("a captures source needs the project's metadata store")
        if artifacts is None and artifacts_url is None:
            raise DataSourceError("a captures source needs the project's artifact store")
        self.environment = environment
        self.model_name = model_name
        self.since = parse_time(since, "since")
        self.until = parse_time(until, "until")
        if self.since and self.until and self.until <= self.since:
            raise DataSourceError(
                f"captures source: until {self.until.isoformat()} is not after since "
                f"{self.since.isoformat()}"
            )
        self._store, self._artifacts = store, artifacts
        self._metadata_url, self._artifacts_url = metadata_url, artifacts_url
        self._lock = threading.RLock()
        self._listed: dict[str, str] | None = None  # path -> sha256, from the last listing
        query = {
            k: v
            for k, v in (("model", model_name), ("since", self.since), ("until", self.until))
            if v is not None
        }
        shown = {k: v.isoformat() if isinstance(v, datetime) else v for k, v in query.items()}
        # Names the source (recorded with a dataset version): no store URL, so no password.
        self.uri = f"captures://{environment}" + (f"?{urlencode(shown)}" if shown else "")

    @classmethod
    def from_config(cls, src: Any, config: Config) -> CapturesSource:
        """The source a ``kind: captures`` entry names, over ``config``'s own stores."""
        return cls(
            environment=src.environment or "",
            model_name=src.model_name,
            since=parse_time(src.since, "since"),
            until=parse_time(src.until, "until"),
            metadata_url=config.metadata_url(),
            artifacts_url=config.artifacts_url(),
        )

    # -- stores ----------------------------------------------------------------------------
    @property
    def store(self) -> MetadataStore:
        if self._store is None:
            from loopline.drivers.metadata.store import MetadataStore

            assert self._metadata_url is not None
            self._store = MetadataStore(self._metadata_url)
            weakref.finalize(self, self._store.close)  # the engine this source opened
        return self._store

    @property
    def artifacts(self) -> ArtifactStore:
        if self._artifacts is None:
            from loopline.drivers.artifacts import ArtifactStore

            assert self._artifacts_url is not None
            self._artifacts = ArtifactStore(self._artifacts_url)
        return self._artifacts

    # -- records ---------------------------------------------------------------------------
    def list_records(self) -> pd.DataFrame:
        """Labelled captures, oldest prediction first (ties by prediction id)."""
        from loopline.drivers.metadata.models import Capture, Feedback, Prediction

        q = (
            select(
                Capture.prediction_id,
                Capture.sha256,
                Capture.at,
                Capture.environment,
                Prediction.at,
                Prediction.model_version,
                Prediction.camera_id,
                Feedback.label,
            )
            .join(Prediction, Prediction.id == Capture.prediction_id)
            .join(Feedback, Feedback.prediction_id == Capture.prediction_id)
            .where(Capture.environment == self.environment)
            # A shadow answer is a second prediction of a request another row answered.
            .where(or_(Prediction.variant.is_(None), Prediction.variant != "shadow"))
            .order_by(Prediction.at, Capture.prediction_id)
        )
        if self.model_name is not None:
            q = q.where(Prediction.model_name == self.model_name)
        if self.since is not None:
            q = q.where(Prediction.at >= self.since)
        if self.until is not None:
            q = q.where(Prediction.at < self.until)
        try:
            with Session(self.store.engine) as s, s.begin():
                rows = s.execute(q).all()
        except LooplineError:
            raise
        except Exception as err:  # a store that is down or not migrated
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise DataSourceError(
                f"cannot read captures from the metadata store: {first}"
            ) from None
        df = pd.DataFrame(
            [
                {
                    "path": f"{PREFIX}{pid}",
                    "label": label,
                    "camera_id": camera or "",
                    "captured_at": _iso(cap_at),
                    "predicted_at": _iso(pred_at),
                    "environment": env or "",
                    "model_version": str(version),
                    "sha256": digest,
                }
                for pid, digest, cap_at, env, pred_at, version, camera, label in rows
                if label
            ],
            columns=list(COLUMNS),
        )
        with self._lock:
            self._listed = dict(zip(df["path"], df["sha256"], strict=True))
        return df

    def fingerprint(self) -> str:
        """Digest of the listing (path, image digest, label): changes with captures and labels."""
        df = self.list_records()
        rows = zip(df["path"], df["sha256"], df["label"], strict=True)
        lines = "".join(f"{p}\0{d}\0{lb}\n" for p, d, lb in rows)
        return sha256_bytes(lines.encode())

    # -- bytes -----------------------------------------------------------------------------
    def read_bytes(self, path: str) -> bytes:
        with self._lock:
            if self._listed is None or path not in self._listed:
                self.list_records()  # listed since (by a later build step, another process)
            digest = (self._listed or {}).get(path)
        if digest is None:
            raise DataSourceError(
                f"{path} is not a labelled capture of {self.uri}; paths read "
                f"{PREFIX}<prediction_id> of the listed records"
            )
        try:
            return self.artifacts.get_bytes(digest)  # re-hashed on read: refuses a bad blob
        except NotFound:
            raise DataSourceError(
                f"{path} is listed but its image (sha256:{digest[:12]}) is missing from the "
                "artifact store"
            ) from None

    def prediction_ids(self, records: pd.DataFrame) -> list[str]:
        """The prediction ids behind ``records``' capture paths (other paths skipped)."""
        return [p[len(PREFIX) :] for p in records["path"].astype(str) if p.startswith(PREFIX)]

"""The metadata store: one engine and its repositories, one per noun.

``MetadataStore(url)`` opens (and creates or upgrades, by Alembic migration) a SQLite file
or a PostgreSQL database; its repositories are listed in the package docstring.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from loopline.drivers.metadata.alerts import AlertRepository
from loopline.drivers.metadata.audit import AuditLog
from loopline.drivers.metadata.captures import CaptureRepository
from loopline.drivers.metadata.database import Database
from loopline.drivers.metadata.datasets import DatasetRepository
from loopline.drivers.metadata.deployments import DeploymentRepository
from loopline.drivers.metadata.devices import DeviceRepository
from loopline.drivers.metadata.loops import LoopRepository
from loopline.drivers.metadata.migrate import MIGRATIONS, head_revision, migrate
from loopline.drivers.metadata.monitor_state import MonitorStateRepository
from loopline.drivers.metadata.predictions import PredictionRepository
from loopline.drivers.metadata.registry import ModelRegistry, Registration, parse_model_ref
from loopline.drivers.metadata.replica_tests import ReplicaTestRepository
from loopline.drivers.metadata.runs import RunClaim, RunRepository
from loopline.drivers.metadata.steps import StepRepository, TrialRepository

__all__ = [
    "MIGRATIONS",
    "MetadataStore",
    "Registration",
    "RunClaim",
    "head_revision",
    "parse_model_ref",
]


class MetadataStore:
    """Records of everything Loopline does, behind any SQLAlchemy URL."""

    def __init__(self, url: str, *, migrate: bool = True) -> None:
        self.url = url
        self._db = Database(url)
        self.datasets = DatasetRepository(self._db)
        self.runs = RunRepository(self._db)
        self.steps = StepRepository(self._db)
        self.trials = TrialRepository(self._db)
        self.models = ModelRegistry(self._db)
        self.audit = AuditLog(self._db)
        self.predictions = PredictionRepository(self._db)
        self.deployments = DeploymentRepository(self._db)
        self.replica_tests = ReplicaTestRepository(self._db)
        self.captures = CaptureRepository(self._db)
        self.devices = DeviceRepository(self._db)
        self.alerts = AlertRepository(self._db)
        self.loops = LoopRepository(self._db)
        self.monitor_state = MonitorStateRepository(self._db)
        if migrate:
            self.migrate()

    @property
    def engine(self) -> Engine:
        return self._db.engine

    def migrate(self) -> None:
        """Create or upgrade the schema to the latest migration (safe to race)."""
        migrate(self._db)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session in a write transaction, committed on exit."""
        with self._db.write() as s:
            yield s

    def close(self) -> None:
        self._db.dispose()

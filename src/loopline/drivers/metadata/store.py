"""The metadata store: datasets, runs, steps, trials, models, aliases and the audit log.

One class over SQLAlchemy 2 serves every backend (a SQLite file by default, PostgreSQL by
URL). The schema is created and upgraded by Alembic on open, so stores grow by migration.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, func, select, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import (
    ArgumentError,
    IntegrityError,
    NoSuchModuleError,
    OperationalError,
    ProgrammingError,
)
from sqlalchemy.orm import Session, sessionmaker

from loopline import __version__
from loopline.drivers.metadata.models import (
    AuditEvent,
    DatasetVersion,
    HpoTrial,
    ModelAlias,
    ModelVersion,
    PipelineRun,
    StepRun,
    utcnow,
)
from loopline.errors import NotFound, StoreError

MIGRATIONS = Path(__file__).parent / "migrations"
_ACTIVE = ("running",)


def _safe_url(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def parse_model_ref(ref: str) -> tuple[str, int | None, str | None]:
    """Split ``NAME``, ``NAME:VERSION`` or ``NAME@ALIAS`` into (name, version, alias)."""
    if "@" in ref:
        name, alias = ref.split("@", 1)
        if not name or not alias:
            raise NotFound(f"invalid model reference {ref!r}: use NAME, NAME:VERSION or NAME@ALIAS")
        return name, None, alias
    if ":" in ref:
        name, raw = ref.split(":", 1)
        if not raw.isdigit():
            raise NotFound(f"invalid model version {raw!r} in {ref!r}: versions are integers")
        return name, int(raw), None
    return ref, None, None


class MetadataStore:
    """Records of everything Loopline does, behind any SQLAlchemy URL."""

    def __init__(self, url: str, *, migrate: bool = True) -> None:
        self.url = url
        try:
            sa_url = make_url(url)
        except ArgumentError:
            raise StoreError(
                f"invalid metadata store URL {url!r}: use e.g. sqlite:///path/loopline.db "
                "or postgresql+psycopg://user@host/db"
            ) from None
        if sa_url.drivername == "postgresql":
            sa_url = sa_url.set(drivername="postgresql+psycopg")
        kwargs: dict[str, Any] = {}
        if sa_url.drivername.startswith("sqlite"):
            if sa_url.database and sa_url.database != ":memory:":
                Path(sa_url.database).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
        else:
            kwargs["pool_pre_ping"] = True
            kwargs["connect_args"] = {"connect_timeout": 5}
        try:
            self.engine: Engine = create_engine(sa_url, **kwargs)
        except (NoSuchModuleError, ArgumentError, ImportError) as err:
            raise StoreError(f"unsupported metadata store URL {_safe_url(url)}: {err}") from None
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        if migrate:
            self.migrate()

    # -- lifecycle ---------------------------------------------------------------------
    def migrate(self) -> None:
        """Create or upgrade the schema to the latest migration.

        Opening an up-to-date store only reads ``alembic_version`` (Alembic itself is
        imported only when there is something to upgrade: it costs ~0.3 s per command).
        """
        try:
            with self.engine.connect() as conn:
                current = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
            if current == head_revision():
                return
        except OperationalError as err:
            if _unreachable(err):
                reason = str(err.orig).strip().splitlines()[0] if err.orig else str(err)
                raise StoreError(
                    f"cannot reach the metadata store at {_safe_url(self.url)}: {reason}"
                ) from None
        except ProgrammingError:
            pass  # no alembic_version table yet: a new store
        from alembic import command
        from alembic.config import Config as AlembicConfig

        cfg = AlembicConfig()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        try:
            with self.engine.begin() as conn:
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
        except OperationalError as err:
            reason = str(err.orig).strip().splitlines()[0] if err.orig else str(err)
            raise StoreError(
                f"cannot reach the metadata store at {_safe_url(self.url)}: {reason}"
            ) from None

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._session() as s, s.begin():
            yield s

    # -- audit ---------------------------------------------------------------------------
    def audit(self, actor: str, action: str, subject: str, **details: Any) -> None:
        with self.session() as s:
            s.add(AuditEvent(actor=actor, action=action, subject=subject, details=details))

    def audit_log(self, limit: int = 100) -> list[AuditEvent]:
        with self.session() as s:
            q = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
            return list(s.scalars(q))

    # -- datasets --------------------------------------------------------------------------
    def add_dataset_version(self, **fields: Any) -> DatasetVersion:
        """Record a dataset version; the same version twice is a no-op."""
        with self.session() as s:
            existing = s.get(DatasetVersion, fields["version"])
            if existing is not None:
                return existing
            row = DatasetVersion(**fields)
            s.add(row)
        return row

    def get_dataset_version(self, version: str) -> DatasetVersion:
        with self.session() as s:
            row = s.get(DatasetVersion, version)
            if row is None:
                matches = list(
                    s.scalars(
                        select(DatasetVersion).where(DatasetVersion.version.startswith(version))
                    )
                )
                if len(matches) == 1:
                    return matches[0]
                raise NotFound(f"no dataset version {version!r} (see `loopline datasets`)")
            return row

    def list_dataset_versions(self) -> list[DatasetVersion]:
        with self.session() as s:
            return list(s.scalars(select(DatasetVersion).order_by(DatasetVersion.created_at)))

    # -- runs --------------------------------------------------------------------------------
    def create_run(
        self,
        run_id: str,
        *,
        pipeline: str,
        project: str,
        config: dict[str, Any],
        trigger: str = "manual",
        trigger_ref: str | None = None,
        git_commit: str | None = None,
    ) -> PipelineRun:
        row = PipelineRun(
            id=run_id,
            pipeline=pipeline,
            project=project,
            status="running",
            trigger=trigger,
            trigger_ref=trigger_ref,
            config=config,
            git_commit=git_commit,
            loopline_version=__version__,
            pid=os.getpid(),
            host=socket.gethostname(),
            started_at=utcnow(),
        )
        with self.session() as s:
            s.add(row)
        return row

    def update_run(self, run_id: str, **fields: Any) -> None:
        with self.session() as s:
            s.execute(update(PipelineRun).where(PipelineRun.id == run_id).values(**fields))

    def get_run(self, run_id: str) -> PipelineRun:
        with self.session() as s:
            row = s.get(PipelineRun, run_id)
            if row is None:
                matches = list(
                    s.scalars(select(PipelineRun).where(PipelineRun.id.startswith(run_id)))
                )
                if len(matches) != 1:
                    raise NotFound(f"no run {run_id!r} (see `loopline runs`)")
                row = matches[0]
            return _mark_dead(row)

    def list_runs(self, limit: int = 50) -> list[PipelineRun]:
        with self.session() as s:
            q = select(PipelineRun).order_by(PipelineRun.started_at.desc()).limit(limit)
            return [_mark_dead(r) for r in s.scalars(q)]

    # -- steps -------------------------------------------------------------------------------
    def start_step(self, run_id: str, step: str, **fields: Any) -> int:
        with self.session() as s:
            row = StepRun(run_id=run_id, step=step, status="running", started_at=utcnow(), **fields)
            s.add(row)
            s.flush()
            return row.id

    def finish_step(self, step_id: int, **fields: Any) -> None:
        with self.session() as s:
            row = s.get(StepRun, step_id)
            if row is None:
                raise NotFound(f"no step run {step_id}")
            now = utcnow()
            started = row.started_at
            if started.tzinfo is None:
                started = started.replace(tzinfo=now.tzinfo)
            fields.setdefault("finished_at", now)
            fields.setdefault("duration_s", (now - started).total_seconds())
            for key, value in fields.items():
                setattr(row, key, value)

    def find_cached_step(self, step: str, cache_key: str) -> StepRun | None:
        """The latest successful run of ``step`` with this cache key, if any."""
        with self.session() as s:
            q = (
                select(StepRun)
                .where(
                    StepRun.step == step,
                    StepRun.cache_key == cache_key,
                    StepRun.status == "succeeded",
                )
                .order_by(StepRun.id.desc())
                .limit(1)
            )
            return s.scalars(q).first()

    def list_steps(self, run_id: str) -> list[StepRun]:
        with self.session() as s:
            q = select(StepRun).where(StepRun.run_id == run_id).order_by(StepRun.id)
            return list(s.scalars(q))

    # -- trials ------------------------------------------------------------------------------
    def record_trial(self, run_id: str, number: int, **fields: Any) -> None:
        """Insert or replace trial ``number`` of a run (a resumed run re-records trials)."""
        with self.session() as s:
            q = select(HpoTrial).where(HpoTrial.run_id == run_id, HpoTrial.number == number)
            row = s.scalars(q).first()
            if row is None:
                row = HpoTrial(run_id=run_id, number=number)
                s.add(row)
            for key, value in fields.items():
                setattr(row, key, value)

    def list_trials(self, run_id: str) -> list[HpoTrial]:
        with self.session() as s:
            q = select(HpoTrial).where(HpoTrial.run_id == run_id).order_by(HpoTrial.number)
            return list(s.scalars(q))

    # -- models ------------------------------------------------------------------------------
    def register_model(
        self,
        name: str,
        *,
        aliases: tuple[str, ...] = ("candidate",),
        actor: str = "loopline",
        **fields: Any,
    ) -> ModelVersion:
        """Register the next version of ``name`` and point ``aliases`` at it, atomically."""
        for attempt in range(5):
            try:
                with self.session() as s:
                    if self.engine.dialect.name == "postgresql":
                        # Serialise registrations of one name: without it, concurrent
                        # writers all read the same max(version) and retries can starve.
                        s.execute(
                            text("SELECT pg_advisory_xact_lock(hashtext(:key))"),
                            {"key": f"loopline.model_versions:{name}"},
                        )
                    latest = s.scalar(
                        select(func.max(ModelVersion.version)).where(ModelVersion.name == name)
                    )
                    row = ModelVersion(name=name, version=(latest or 0) + 1, **fields)
                    s.add(row)
                    s.flush()
                    for alias in aliases:
                        _set_alias(s, name, alias, row.version)
                    s.add(
                        AuditEvent(
                            actor=actor,
                            action="model.register",
                            subject=f"{name}:{row.version}",
                            details={"aliases": list(aliases), "run_id": fields.get("run_id")},
                        )
                    )
                return row
            except IntegrityError:
                if attempt == 4:
                    raise
        raise AssertionError("unreachable")

    def get_model_version(
        self, name: str, version: int | None = None, alias: str | None = None
    ) -> ModelVersion:
        """A version by number, by alias, or the latest when neither is given."""
        with self.session() as s:
            if alias is not None:
                a = s.get(ModelAlias, (name, alias))
                if a is None:
                    raise NotFound(f"model {name!r} has no alias {alias!r}")
                version = a.version
            q = select(ModelVersion).where(ModelVersion.name == name)
            if version is not None:
                q = q.where(ModelVersion.version == version)
            row = s.scalars(q.order_by(ModelVersion.version.desc()).limit(1)).first()
            if row is None:
                what = f"{name}:{version}" if version is not None else name
                raise NotFound(f"no model version {what} (see `loopline models`)")
            return row

    def resolve_model(self, ref: str) -> ModelVersion:
        """Resolve ``NAME``, ``NAME:VERSION`` or ``NAME@ALIAS``."""
        name, version, alias = parse_model_ref(ref)
        return self.get_model_version(name, version, alias)

    def list_model_versions(self, name: str | None = None) -> list[ModelVersion]:
        with self.session() as s:
            q = select(ModelVersion).order_by(ModelVersion.name, ModelVersion.version)
            if name is not None:
                q = q.where(ModelVersion.name == name)
            return list(s.scalars(q))

    def aliases(self, name: str | None = None) -> dict[tuple[str, int], list[str]]:
        """Map (name, version) to the aliases pointing at it."""
        with self.session() as s:
            q = select(ModelAlias)
            if name is not None:
                q = q.where(ModelAlias.name == name)
            out: dict[tuple[str, int], list[str]] = {}
            for a in s.scalars(q.order_by(ModelAlias.alias)):
                out.setdefault((a.name, a.version), []).append(a.alias)
            return out

    def set_alias(self, name: str, alias: str, version: int, actor: str = "loopline") -> None:
        with self.session() as s:
            exists = s.scalar(
                select(ModelVersion.id).where(
                    ModelVersion.name == name, ModelVersion.version == version
                )
            )
            if exists is None:
                raise NotFound(f"no model version {name}:{version} (see `loopline models`)")
            _set_alias(s, name, alias, version)
            s.add(
                AuditEvent(
                    actor=actor,
                    action="model.alias",
                    subject=f"{name}:{version}",
                    details={"alias": alias},
                )
            )

    def model_version_dict(self, mv: ModelVersion) -> dict[str, Any]:
        """The JSON form of a model version, aliases included (the CLI's contract)."""
        out = mv.to_dict()
        out.pop("id", None)
        out["aliases"] = self.aliases(mv.name).get((mv.name, mv.version), [])
        return out

    # -- prediction log and feedback (written by the prediction server) -------------------
    def log_predictions(self, rows: list[dict[str, Any]]) -> int:
        """Insert prediction rows in one transaction; an id already stored is skipped.

        Skipping known ids makes a retried flush safe after a commit whose answer was lost.
        """
        from sqlalchemy import insert

        from loopline.drivers.metadata.models import Prediction

        if not rows:
            return 0
        dialect = self.engine.dialect.name
        if dialect == "sqlite":
            return self._log_predictions_sqlite(rows)
        if dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            stmt: Any = pg_insert(Prediction).on_conflict_do_nothing(index_elements=["id"])
        else:
            stmt = insert(Prediction)
        with self.engine.begin() as conn:
            conn.execute(stmt, rows)
        return len(rows)

    _PREDICTION_COLUMNS = (
        "id", "at", "model_name", "model_version", "source", "label", "confidence",
        "probabilities", "request_metadata", "input_stats",
    )  # fmt: skip

    def _log_predictions_sqlite(self, rows: list[dict[str, Any]]) -> int:
        """The SQLite fast path: one ``executemany`` on the driver, JSON encoded by orjson.

        The server writes about a thousand rows a second per process; SQLAlchemy's per-row
        type processing cost ~29 us a row, held the GIL and showed in the server's latency
        tail. Values are stored exactly as SQLAlchemy's own types store them (a naive UTC
        ``YYYY-MM-DD HH:MM:SS.ffffff`` text for times, JSON text), so the ORM reads them back.
        """
        import orjson

        def js(value: Any) -> str | None:
            return None if value is None else orjson.dumps(value).decode()

        params = [
            (
                r["id"],
                r["at"].astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f"),
                r["model_name"],
                r["model_version"],
                r["source"],
                r["label"],
                r["confidence"],
                js(r.get("probabilities")),
                js(r.get("request_metadata")),
                js(r.get("input_stats")),
            )
            for r in rows
        ]
        columns = ", ".join(self._PREDICTION_COLUMNS)
        marks = ", ".join("?" * len(self._PREDICTION_COLUMNS))
        sql = f"INSERT OR IGNORE INTO predictions ({columns}) VALUES ({marks})"
        with self.engine.begin() as conn:
            conn.exec_driver_sql(sql, params)
        return len(rows)

    def record_feedback(
        self, items: list[tuple[str, str]], labels: list[str] | None = None
    ) -> list[dict[str, Any]]:
        """Record ground-truth labels for predictions, idempotently.

        Returns one result per item, in order: ``status`` is ``recorded`` (new), ``updated``
        (a different label replaced the old one), ``unchanged`` (the same label again) or
        ``error`` with a ``code`` (``unknown_prediction``, ``unknown_label``: not in
        ``labels`` when given) and an ``error`` message.
        """
        from loopline.drivers.metadata.models import Feedback, Prediction

        for attempt in range(3):
            try:
                with self.session() as s:
                    ids = sorted({pid for pid, _ in items})
                    known: set[str] = set()
                    existing: dict[str, Feedback] = {}
                    for i in range(0, len(ids), 500):
                        chunk = ids[i : i + 500]
                        known.update(
                            s.scalars(select(Prediction.id).where(Prediction.id.in_(chunk)))
                        )
                        q = select(Feedback).where(Feedback.prediction_id.in_(chunk))
                        existing.update((fb.prediction_id, fb) for fb in s.scalars(q))
                    now = utcnow()
                    results: list[dict[str, Any]] = []
                    for pid, label in items:
                        out: dict[str, Any] = {"prediction_id": pid, "label": label}
                        results.append(out)
                        if labels is not None and label not in labels:
                            out["status"] = "error"
                            out["code"] = "unknown_label"
                            out["error"] = f"unknown label {label!r}; expected one of {labels}"
                        elif pid not in known:
                            out["status"] = "error"
                            out["code"] = "unknown_prediction"
                            out["error"] = f"unknown prediction_id {pid!r}"
                        elif pid not in existing:
                            fb = Feedback(prediction_id=pid, label=label, at=now, updated_at=now)
                            s.add(fb)
                            existing[pid] = fb
                            out["status"] = "recorded"
                        elif existing[pid].label == label:
                            out["status"] = "unchanged"
                        else:
                            existing[pid].label = label
                            existing[pid].updated_at = now
                            out["status"] = "updated"
                return results
            except IntegrityError:  # the same id recorded concurrently: read it again
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def get_predictions(
        self,
        model_name: str | None = None,
        model_version: int | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int | None = None,
    ) -> list[Any]:
        """Logged predictions (``Prediction`` rows), oldest first, filtered as given."""
        from loopline.drivers.metadata.models import Prediction

        q = _prediction_filter(select(Prediction), model_name, model_version, since, until)
        q = q.order_by(Prediction.at, Prediction.id)
        if limit is not None:
            q = q.limit(limit)
        with self.session() as s:
            return list(s.scalars(q))

    def count_predictions(
        self,
        model_name: str | None = None,
        model_version: int | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> int:
        from loopline.drivers.metadata.models import Prediction

        q = select(func.count()).select_from(Prediction)
        q = _prediction_filter(q, model_name, model_version, since, until)
        with self.session() as s:
            return int(s.scalar(q) or 0)

    def get_feedback(self, prediction_ids: list[str]) -> dict[str, str]:
        """The ground-truth label of each of ``prediction_ids`` that has one."""
        from loopline.drivers.metadata.models import Feedback

        out: dict[str, str] = {}
        with self.session() as s:
            for i in range(0, len(prediction_ids), 500):
                chunk = prediction_ids[i : i + 500]
                q = select(Feedback).where(Feedback.prediction_id.in_(chunk))
                out.update((fb.prediction_id, fb.label) for fb in s.scalars(q))
        return out


def _set_alias(s: Session, name: str, alias: str, version: int) -> None:
    row = s.get(ModelAlias, (name, alias))
    if row is None:
        s.add(ModelAlias(name=name, alias=alias, version=version, updated_at=utcnow()))
    else:
        row.version = version
        row.updated_at = utcnow()


def head_revision() -> str:
    """The newest migration's revision id (files are named ``NNNN_description.py``)."""
    names = sorted(p.name for p in (MIGRATIONS / "versions").glob("[0-9]*_*.py"))
    return names[-1].split("_", 1)[0]


def _unreachable(err: OperationalError) -> bool:
    """True when the server cannot be reached, as opposed to a missing table (SQLite)."""
    return "no such table" not in str(err.orig)


def _mark_dead(run: PipelineRun) -> PipelineRun:
    """Report a 'running' run whose process is gone (killed) as 'interrupted'."""
    if run.status in _ACTIVE and run.host == socket.gethostname() and run.pid:
        try:
            os.kill(run.pid, 0)
        except ProcessLookupError:
            run.status = "interrupted"
        except PermissionError:
            pass
    return run


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _prediction_filter(
    q: Any,
    model_name: str | None,
    model_version: int | None,
    since: datetime | None,
    until: datetime | None,
) -> Any:
    from loopline.drivers.metadata.models import Prediction

    if model_name is not None:
        q = q.where(Prediction.model_name == model_name)
    if model_version is not None:
        q = q.where(Prediction.model_version == model_version)
    if since is not None:
        q = q.where(Prediction.at >= since)
    if until is not None:
        q = q.where(Prediction.at < until)
    return q

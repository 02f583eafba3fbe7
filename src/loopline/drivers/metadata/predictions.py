"""The prediction log and feedback, written by the prediction server and read by Monitor."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Row, case, func, or_, select
from sqlalchemy.exc import IntegrityError

from loopline.clock import utc as as_utc
from loopline.drivers.metadata.database import Database
from loopline.drivers.metadata.models import Feedback, Prediction, utcnow

# The columns of ``predictions`` the prediction server writes.
COLUMNS = (
    "id", "at", "model_name", "model_version", "source", "label", "confidence",
    "probabilities", "request_metadata", "input_stats",
    "environment", "deployment_generation", "variant", "camera_id",
)  # fmt: skip
# Columns a row may leave out (rows spilled by an older server lack them): stored as NULL.
OPTIONAL_COLUMNS = ("environment", "deployment_generation", "variant", "camera_id")
_CHUNK = 500  # ids per IN (...) list, well under every backend's parameter limit
_NULLS: dict[str, Any] = dict.fromkeys(OPTIONAL_COLUMNS)


class PredictionRepository:
    """``store.predictions``: log predictions, record feedback, read both back."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._sqlite_cache: tuple[str, Any] | None = None

    def log(self, rows: list[dict[str, Any]]) -> int:
        """Insert prediction rows in one transaction; an id already stored is skipped.

        Skipping known ids makes a retried flush safe after a commit whose answer was lost.
        """
        if not rows:
            return 0
        if self._db.dialect == "sqlite":
            return self._log_sqlite(rows)
        stmt = self._db.insert(Prediction).on_conflict_do_nothing(index_elements=["id"])
        # An executemany takes its columns from the first row: every row needs them all.
        if any(len(r) != len(rows[0]) or OPTIONAL_COLUMNS[0] not in r for r in rows):
            rows = [{**_NULLS, **r} for r in rows]
        with self._db.write_connection() as conn:
            conn.execute(stmt, rows)
        return len(rows)

    def _log_sqlite(self, rows: list[dict[str, Any]]) -> int:
        """The SQLite fast path: one ``executemany`` on the driver, JSON encoded by orjson.

        The server writes about a thousand rows a second per process, and SQLAlchemy's
        per-row processing of an ``executemany`` costs twice the CPU of this path, held
        under the GIL, in the server's latency tail (``benchmarks/predlog_bench.py``
        measures both). The statement is SQLAlchemy's own ``INSERT OR IGNORE``, times are
        encoded by the column type's own bind processor, and JSON is plain JSON text, so
        the ORM reads these rows exactly as its own (``tests/drivers/metadata/
        test_prediction_rows.py`` holds both paths to the same rows).
        """
        import orjson

        sql, encode_at = self._sqlite_insert()

        def js(value: Any) -> str | None:
            return None if value is None else orjson.dumps(value).decode()

        def param(r: dict[str, Any]) -> tuple[Any, ...]:  # in the order of COLUMNS
            return (
                r["id"],
                encode_at(r["at"].astimezone(UTC)),
                r["model_name"],
                r["model_version"],
                r["source"],
                r["label"],
                r["confidence"],
                js(r.get("probabilities")),
                js(r.get("request_metadata")),
                js(r.get("input_stats")),
                r.get("environment"),
                r.get("deployment_generation"),
                r.get("variant"),
                r.get("camera_id"),
            )

        with self._db.write_connection() as conn:
            conn.exec_driver_sql(sql, [param(r) for r in rows])
        return len(rows)

    def _sqlite_insert(self) -> tuple[str, Any]:
        """The compiled ``INSERT OR IGNORE`` (parameters in the order of COLUMNS) and the
        time column's encoder."""
        if self._sqlite_cache is None:
            from sqlalchemy import insert

            dialect = self._db.engine.dialect
            table = Prediction.__table__
            stmt = insert(Prediction).prefix_with("OR IGNORE").values({c: None for c in COLUMNS})
            compiled = stmt.compile(dialect=dialect)
            assert tuple(compiled.positiontup or ()) == COLUMNS
            at_type = table.c.at.type.dialect_impl(dialect)
            self._sqlite_cache = (str(compiled), at_type.bind_processor(dialect))
        return self._sqlite_cache

    def record_feedback(
        self, items: list[tuple[str, str]], labels: list[str] | None = None
    ) -> list[dict[str, Any]]:
        """Record ground-truth labels for predictions, idempotently.

        Returns one result per item, in order: ``status`` is ``recorded`` (new), ``updated``
        (a different label replaced the old one), ``unchanged`` (the same label again) or
        ``error`` with a ``code`` (``unknown_prediction``, ``unknown_label``: not in
        ``labels`` when given) and an ``error`` message.
        """
        for attempt in range(3):
            try:
                with self._db.write() as s:
                    return _record_feedback(s, items, labels)
            except IntegrityError:  # the same id recorded concurrently: read it again
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def find(
        self,
        model_name: str | None = None,
        model_version: int | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int | None = None,
    ) -> list[Prediction]:
        """Logged predictions, oldest first, filtered as given (``until`` exclusive)."""
        q = _filter(select(Prediction), model_name, model_version, since, until)
        q = q.order_by(Prediction.at, Prediction.id)
        if limit is not None:
            q = q.limit(limit)
        with self._db.read() as s:
            return list(s.scalars(q))

    def count(
        self,
        model_name: str | None = None,
        model_version: int | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> int:
        """How many predictions match the filters of ``find``."""
        q = _filter(
            select(func.count()).select_from(Prediction), model_name, model_version, since, until
        )
        with self._db.read() as s:
            return int(s.scalar(q) or 0)

    def labelled_accuracy(
        self,
        *,
        environment: str,
        model_name: str,
        since: datetime,
        versions: list[int] | None = None,
    ) -> dict[int, tuple[int, int]]:
        """Per answering version of an environment since ``since``: (labelled, correct).

        Shadow answers are left out (they never reached a client), and so are answers to
        requests that named their version (``addressed``: a replica test's, say), which
        are neither canary nor stable traffic.
        """
        correct = func.sum(case((Feedback.label == Prediction.label, 1), else_=0))
        q = (
            select(Prediction.model_version, func.count(), correct)
            .join(Feedback, Feedback.prediction_id == Prediction.id)
            .where(
                Prediction.environment == environment,
                Prediction.model_name == model_name,
                Prediction.at >= since,
                or_(
                    Prediction.variant.is_(None),
                    Prediction.variant.not_in(("shadow", "addressed")),
                ),
            )
            .group_by(Prediction.model_version)
        )
        if versions is not None:
            q = q.where(Prediction.model_version.in_(versions))
        with self._db.read() as s:
            return {int(v): (int(n), int(c or 0)) for v, n, c in s.execute(q)}

    def feedback(self, prediction_ids: list[str]) -> dict[str, str]:
        """The ground-truth label of each of ``prediction_ids`` that has one."""
        out: dict[str, str] = {}
        with self._db.read() as s:
            for i in range(0, len(prediction_ids), _CHUNK):
                chunk = prediction_ids[i : i + _CHUNK]
                q = select(Feedback).where(Feedback.prediction_id.in_(chunk))
                out.update((fb.prediction_id, fb.label) for fb in s.scalars(q))
        return out

    # Incremental reads for Monitor (``loopline.monitor.stream``). Core selects of the
    # columns a pass needs, never ORM objects, each on an index: feedback by
    # ``updated_at`` (ix_feedback_updated_at), predictions by ``at`` (ix_predictions_at or
    # ix_predictions_env_at). Only routed answers: shadow and addressed ones are left out.
    # Pages go by the key ``(time, id)`` (keyset pagination): ``after`` is the last key
    # read, so a page cut inside a group of equal times resumes exactly where it stopped.
    # The time index bounds the scan (``time >= t``) and gives the time order; the ids of
    # one time are sorted as a group (PostgreSQL: an incremental sort, no new index). Ids
    # compare bytewise (``COLLATE "C"`` on PostgreSQL, SQLite's own), Python's ``str`` order.

    def labelled_rows(
        self,
        environment: str,
        model_name: str,
        *,
        after: tuple[datetime, str] | None = None,
        ids: list[str] | None = None,
        newest: bool = False,
        limit: int | None = None,
        metadata: bool = True,
    ) -> list[Row[Any]]:
        """Labelled predictions (the log joined with its feedback), by label time.

        ``after`` keeps rows whose key ``(labelled_at, id)`` is greater; ``ids`` only
        those predictions; ``newest`` takes the newest ``limit`` instead of the oldest.
        Rows are in key order and have ``id, at, labelled_at, model_version, variant,
        predicted, actual, confidence, camera_id`` and, with ``metadata``,
        ``request_metadata``.
        """
        cols = [*_LABELLED_COLUMNS, *([Prediction.request_metadata] if metadata else [])]
        q = _routed(
            select(*cols).join(Prediction, Prediction.id == Feedback.prediction_id),
            environment,
            model_name,
        )
        key = (Feedback.updated_at, Feedback.prediction_id)
        return self._rows(q, key, "labelled_at", after, ids, newest, limit)

    def labelled_keys(
        self, environment: str, model_name: str, since: datetime, until: datetime
    ) -> list[tuple[str, datetime]]:
        """``(prediction_id, labelled_at)`` of the labels written in ``[since, until]``."""
        q = _routed(
            select(Feedback.prediction_id, Feedback.updated_at)
            .join(Prediction, Prediction.id == Feedback.prediction_id)
            .where(Feedback.updated_at >= as_utc(since), Feedback.updated_at <= as_utc(until)),
            environment,
            model_name,
        )
        with self._db.engine.connect() as conn:
            return [(r[0], r[1]) for r in conn.execute(q)]

    def logged_rows(
        self,
        environment: str,
        model_name: str,
        *,
        after: tuple[datetime, str] | None = None,
        ids: list[str] | None = None,
        newest: bool = False,
        limit: int | None = None,
        metadata: bool = True,
    ) -> list[Row[Any]]:
        """Logged predictions, labelled or not, by the key ``(at, id)`` (as
        ``labelled_rows``).

        Rows have ``id, at, model_version, variant, predicted, confidence,
        probabilities, input_stats, camera_id`` and, with ``metadata``,
        ``request_metadata``.
        """
        cols = [*_LOGGED_COLUMNS, *([Prediction.request_metadata] if metadata else [])]
        q = _routed(select(*cols), environment, model_name)
        return self._rows(q, (Prediction.at, Prediction.id), "at", after, ids, newest, limit)

    def logged_keys(
        self, environment: str, model_name: str, since: datetime, until: datetime
    ) -> list[tuple[str, datetime]]:
        """``(id, at)`` of the predictions made in ``[since, until]``."""
        q = _routed(
            select(Prediction.id, Prediction.at).where(
                Prediction.at >= as_utc(since), Prediction.at <= as_utc(until)
            ),
            environment,
            model_name,
        )
        with self._db.engine.connect() as conn:
            return [(r[0], r[1]) for r in conn.execute(q)]

    def _rows(
        self,
        q: Any,
        key: tuple[Any, Any],
        time_name: str,
        after: tuple[datetime, str] | None,
        ids: list[str] | None,
        newest: bool,
        limit: int | None,
    ) -> list[Row[Any]]:
        time_col, id_col = key
        if ids is not None:
            out: list[Row[Any]] = []
            with self._db.engine.connect() as conn:
                for i in range(0, len(ids), _CHUNK):
                    out.extend(conn.execute(q.where(id_col.in_(ids[i : i + _CHUNK]))))
            return sorted(out, key=lambda r: (as_utc(r._mapping[time_name]), r.id))
        bytewise = id_col.collate("C") if self._db.dialect == "postgresql" else id_col
        if after is not None:
            t, last = as_utc(after[0]), after[1]
            # ``time >= t`` alone bounds the index scan; the OR only filters its first group.
            q = q.where(time_col >= t, or_(time_col > t, bytewise > last))
        order = (time_col.desc(), bytewise.desc()) if newest else (time_col, bytewise)
        q = q.order_by(*order)
        if limit is not None:
            q = q.limit(limit)
        with self._db.engine.connect() as conn:
            rows = list(conn.execute(q))
        return rows[::-1] if newest else rows

    def with_feedback(
        self,
        environment: str,
        model_name: str,
        *,
        since: datetime | None = None,
        labelled: bool = False,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        """The log joined with its feedback (every variant), the newest ``limit`` made at
        or after ``since``, oldest first; ``labelled`` keeps only answers with a label."""
        q = select(
            *_LOGGED_COLUMNS,
            Prediction.request_metadata,
            Prediction.deployment_generation,
            Feedback.label.label("actual"),
            Feedback.updated_at.label("labelled_at"),
        ).where(Prediction.environment == environment, Prediction.model_name == model_name)
        if labelled:
            q = q.join(Feedback, Feedback.prediction_id == Prediction.id)
        else:
            q = q.outerjoin(Feedback, Feedback.prediction_id == Prediction.id)
        if since is not None:
            q = q.where(Prediction.at >= as_utc(since))
        q = q.order_by(Prediction.at.desc(), Prediction.id.desc())
        if limit is not None:
            q = q.limit(limit)
        with self._db.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q)][::-1]

    def labelled_versions(self, environment: str, model_name: str) -> list[int]:
        """The versions of ``model_name`` with labelled routed answers in ``environment``."""
        q = _routed(
            select(Prediction.model_version)
            .join(Feedback, Feedback.prediction_id == Prediction.id)
            .distinct(),
            environment,
            model_name,
        )
        with self._db.engine.connect() as conn:
            return sorted(int(v) for (v,) in conn.execute(q))

    def latest_labelled(
        self,
        environment: str,
        model_name: str,
        version: int,
        window: int,
        by: str | None = None,
    ) -> list[Row[Any]]:
        """The newest ``window`` labelled routed answers of a version, by prediction time;
        with ``by`` (``camera_id`` or a request-metadata key), the newest ``window`` of
        each of its values, each row with its ``segment``. Rows as ``labelled_rows``."""
        base = _routed(
            select(*_LABELLED_COLUMNS).join(Prediction, Prediction.id == Feedback.prediction_id),
            environment,
            model_name,
        ).where(Prediction.model_version == version)
        newest = (Prediction.at.desc(), Prediction.id.desc())
        if by is None:
            q = base.order_by(*newest).limit(window)
        else:
            seg = segment_column(by)
            rank = func.row_number().over(partition_by=seg, order_by=newest)
            sub = base.add_columns(seg.label("segment"), rank.label("rank")).subquery()
            q = select(sub).where(sub.c.rank <= window)
        with self._db.engine.connect() as conn:
            return list(conn.execute(q))


def _record_feedback(
    s: Any, items: list[tuple[str, str]], labels: list[str] | None
) -> list[dict[str, Any]]:
    ids = sorted({pid for pid, _ in items})
    known: set[str] = set()
    existing: dict[str, Feedback] = {}
    for i in range(0, len(ids), _CHUNK):
        chunk = ids[i : i + _CHUNK]
        known.update(s.scalars(select(Prediction.id).where(Prediction.id.in_(chunk))))
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


def _filter(
    q: Any,
    model_name: str | None,
    model_version: int | None,
    since: datetime | None,
    until: datetime | None,
) -> Any:
    if model_name is not None:
        q = q.where(Prediction.model_name == model_name)
    if model_version is not None:
        q = q.where(Prediction.model_version == model_version)
    if since is not None:
        q = q.where(Prediction.at >= since)
    if until is not None:
        q = q.where(Prediction.at < until)
    return q


_LABELLED_COLUMNS = (
    Feedback.prediction_id.label("id"),
    Prediction.at,
    Feedback.updated_at.label("labelled_at"),
    Prediction.model_version,
    Prediction.variant,
    Prediction.label.label("predicted"),
    Feedback.label.label("actual"),
    Prediction.confidence,
    Prediction.camera_id,
)
_LOGGED_COLUMNS = (
    Prediction.id,
    Prediction.at,
    Prediction.model_version,
    Prediction.variant,
    Prediction.label.label("predicted"),
    Prediction.confidence,
    Prediction.probabilities,
    Prediction.input_stats,
    Prediction.camera_id,
)
UNROUTED_VARIANTS = ("shadow", "addressed")


def segment_column(name: str) -> Any:
    """The SQL expression of a segment: the ``camera_id`` column, or a request-metadata
    key (as text)."""
    if name == "camera_id":
        return Prediction.camera_id
    return Prediction.request_metadata[name].as_string()


def _routed(q: Any, environment: str, model_name: str) -> Any:
    return q.where(
        Prediction.environment == environment,
        Prediction.model_name == model_name,
        or_(Prediction.variant.is_(None), Prediction.variant.not_in(UNROUTED_VARIANTS)),
    )

"""The monitor's incremental read: what was labelled and logged since the last pass.

A pass costs what arrived since the cursor, not the size of the log. Each of the two
streams (labels by ``feedback.updated_at``, predictions by ``at``) keeps a high-water mark
``hw``: the next pass reads rows strictly after it (at most ``limit``, oldest first), and
re-checks the last ``late_s`` before it by key only (id and time), so a row committed up
to ``late_s`` after its time (a server's batched or spilled flush, a slow transaction)
is still read, once: the cursor holds the ids seen in that span and drops them.

A label updated to a different value gets a new ``updated_at`` and is read again: a new
``Outcome`` for the same prediction, which replaces the previous one in the windows
(``loopline.monitor.windows``).

The cursor is plain JSON: marks as ISO-8601 strings, seen times as integer microseconds
since the epoch (compact; exact). The seen set is bounded by ``MAX_SEEN`` per stream: at
more rows per ``late_s`` than that, the late re-check covers only the newest ``MAX_SEEN``
rows' span (``floor``) instead of all of ``late_s``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from loopline.monitor.types import Logged, Outcome

if TYPE_CHECKING:
    from loopline.drivers.metadata.store import MetadataStore

CURSOR_VERSION = 1
MAX_SEEN = 20_000
BACKFILL = 10_000  # newest rows a first pass reads: windows of 500 for 20 segment values
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)


@dataclass
class NewRows:
    """What one ``read_new`` found: labelled predictions in label-arrival order, logged
    predictions in prediction-time order, and the cursor for the next call. ``more`` is
    True when a limit was hit (call again to catch up)."""

    outcomes: list[Outcome]
    logged: list[Logged]
    cursor: dict[str, Any]
    more: bool = False


def read_new(
    store: MetadataStore,
    environment: str,
    model_name: str,
    cursor: dict[str, Any] | None,
    segments: list[str],
    late_s: float,
    limit: int = 50_000,
    *,
    backfill: int | None = None,
) -> NewRows:
    """Labelled and logged predictions of ``model_name`` in ``environment`` since
    ``cursor`` (routed answers only: shadow and addressed variants are left out).

    The first call (``cursor`` None) reads the newest ``backfill`` rows of each stream
    (default ``BACKFILL``, at most ``limit``), not the whole log. ``segments`` names
    the segment columns each row carries: ``camera_id`` from its column, any other from
    ``request_metadata``.
    """
    cursor = cursor if cursor and cursor.get("v") == CURSOR_VERSION else {}
    metadata = any(s != "camera_id" for s in segments)
    preds = store.predictions
    first = backfill if backfill is not None else min(BACKFILL, limit)

    def labelled(**kw: Any) -> list[Any]:
        return preds.labelled_rows(environment, model_name, metadata=metadata, **kw)

    def logged(**kw: Any) -> list[Any]:
        return preds.logged_rows(environment, model_name, metadata=metadata, **kw)

    def labelled_keys(lo: datetime, hi: datetime) -> list[tuple[str, datetime]]:
        return preds.labelled_keys(environment, model_name, lo, hi)

    def logged_keys(lo: datetime, hi: datetime) -> list[tuple[str, datetime]]:
        return preds.logged_keys(environment, model_name, lo, hi)

    label_rows, label_state, label_more = _advance(
        cursor.get("labels"), "labelled_at", labelled, labelled_keys, late_s, limit, first
    )
    log_rows, log_state, log_more = _advance(
        cursor.get("logged"), "at", logged, logged_keys, late_s, limit, first
    )
    outcomes = [_outcome(r, segments) for r in label_rows]
    logs = [_logged(r, segments) for r in log_rows]
    new_cursor = {"v": CURSOR_VERSION, "labels": label_state, "logged": log_state}
    return NewRows(outcomes, logs, new_cursor, more=label_more or log_more)


def _advance(
    state: dict[str, Any] | None,
    time_key: str,
    rows_after: Any,
    keys_between: Any,
    late_s: float,
    limit: int,
    first: int,
) -> tuple[list[Any], dict[str, Any], bool]:
    """One stream's new rows and next state: rows after the mark, plus the rows of the
    last ``late_s`` before it that the previous passes had not seen."""

    def when(row: Any) -> datetime:
        return as_utc(row._mapping[time_key])

    state = state or {}
    hw = _parse(state.get("hw"))
    late_s = max(late_s, 0.0)
    keys: dict[str, datetime] = {}
    if hw is None:
        rows = sorted(rows_after(newest=True, limit=first), key=lambda r: (when(r), r.id))
        fresh, more = rows, False
        # Rows older than a full backfill are skipped, not late: the floor sits above them.
        floor = when(rows[0]) + _US if rows and len(rows) >= first else None
    else:
        seen: dict[str, int] = state.get("seen") or {}
        rows = rows_after(after=hw, limit=limit)
        more = len(rows) >= limit
        lo = max(hw - timedelta(seconds=late_s), _parse(state.get("floor")) or hw)
        late = keys_between(lo, hw)
        keys.update((i, as_utc(t)) for i, t in late)
        missed = [i for i, t in keys.items() if seen.get(i) != _us(t)]
        # A row changed again since the keys were read (a label updated after ``hw``) is
        # left to the next pass, which reads it after the mark or re-checks it.
        late_rows = [r for r in rows_after(ids=missed) if when(r) <= hw] if missed else []
        keys.update((r.id, when(r)) for r in late_rows)
        fresh = sorted([*late_rows, *rows], key=lambda r: (when(r), r.id))
        floor = lo  # never moves back: what lies below it was left behind on purpose
    keys.update((r.id, when(r)) for r in rows)
    new_hw = max([when(r) for r in rows] + ([hw] if hw is not None else []), default=None)
    if new_hw is None:
        return fresh, {"hw": None, "floor": None, "seen": {}}, more
    cut = new_hw - timedelta(seconds=late_s)
    if floor is not None:
        cut = max(cut, floor)
    recent = sorted(((t, i) for i, t in keys.items() if t >= cut), reverse=True)
    if len(recent) > MAX_SEEN:
        cut = recent[MAX_SEEN][0] + _US  # just above the newest time left out
        recent = [(t, i) for t, i in recent[:MAX_SEEN] if t >= cut]
    next_state = {
        "hw": new_hw.isoformat(),
        "floor": cut.isoformat(),
        "seen": {i: _us(t) for t, i in recent},
    }
    return fresh, next_state, more


def segment_values(row: Any, segments: list[str]) -> dict[str, str]:
    """A row's segment values: ``camera_id`` from its column, others from its metadata."""
    out: dict[str, str] = {}
    meta = getattr(row, "request_metadata", None)
    meta = meta if isinstance(meta, dict) else {}
    for col in segments:
        value = row.camera_id if col == "camera_id" else meta.get(col)
        if value is not None and value != "":
            out[col] = str(value)
    return out


def _outcome(r: Any, segments: list[str]) -> Outcome:
    return Outcome(
        prediction_id=r.id,
        at=as_utc(r.at),
        labelled_at=as_utc(r.labelled_at),
        model_version=int(r.model_version),
        variant=r.variant,
        predicted=r.predicted,
        actual=r.actual,
        confidence=float(r.confidence),
        segments=segment_values(r, segments),
    )


def _logged(r: Any, segments: list[str]) -> Logged:
    return Logged(
        prediction_id=r.id,
        at=as_utc(r.at),
        model_version=int(r.model_version),
        variant=r.variant,
        predicted=r.predicted,
        confidence=float(r.confidence),
        probabilities=r.probabilities,
        input_stats=r.input_stats,
        segments=segment_values(r, segments),
    )


def as_utc(value: datetime) -> datetime:
    """Times as aware UTC (SQLite hands back naive UTC)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _us(value: datetime) -> int:
    return (value - _EPOCH) // _US


def _parse(value: str | None) -> datetime | None:
    return as_utc(datetime.fromisoformat(value)) if value else None

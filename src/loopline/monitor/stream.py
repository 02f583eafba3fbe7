"""The monitor's incremental read: what was labelled and logged since the last pass.

A pass costs what arrived since the cursor, not the size of the log. Each of the two
streams (labels by ``feedback.updated_at``, predictions by ``at``) is read in the order of
its key ``(time, id)`` and keeps a ``mark``, the last key read: the next pass reads the
rows after it (at most ``limit``, keyset pagination), so a limit that cuts a group of
equal times (one feedback POST stamps all its labels with one time) resumes inside it.

Rows also arrive late: a server's batched or spilled flush, a slow transaction, commits
rows whose time is already behind the mark. Each pass re-checks the keys of the last
``late_s`` before the mark (keys only: id and time) against the digests of the keys it
had seen there, and reads the rows it had not: a row committed up to ``late_s`` late is
read, once. The seen set is bounded by ``MAX_SEEN`` per stream: at more rows per
``late_s`` than that, the re-check covers only the newest ``MAX_SEEN`` keys (``floor``,
the newest key left out; it never moves back).

A label updated to a different value gets a new ``updated_at``, so a new key, and is read
again: a new ``Outcome`` for the same prediction, which replaces the previous one in the
windows (``loopline.monitor.windows``).

The cursor is plain JSON: keys as ``[ISO-8601 time, id]``, the seen set as one base64
string of sorted 8-byte BLAKE2b digests of ``id`` and time in microseconds (a late row is
missed only if its digest equals one of at most ``MAX_SEEN`` others: odds under 1e-14).
Its size is at most about ``2 * MAX_SEEN * 11`` characters, whatever the ids.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from loopline.clock import to_us, utc
from loopline.monitor.types import Logged, Outcome

if TYPE_CHECKING:
    from loopline.drivers.metadata.store import MetadataStore

CURSOR_VERSION = 2
MAX_SEEN = 20_000
BACKFILL = 10_000  # newest rows a first pass reads: windows of 500 for 20 segment values
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_DIGEST = 8

Key = tuple[datetime, str]  # (time, id): the order both streams are read in


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

    The first call (``cursor`` None, or one of another format) reads the newest
    ``backfill`` rows of each stream (default ``BACKFILL``, at most ``limit``), not the
    whole log; one that finds nothing marks the epoch, so what comes later is read
    whole. ``segments`` names the segment columns each row carries: ``camera_id`` from
    its column, any other from ``request_metadata``.
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

    def key(row: Any) -> Key:
        return utc(row._mapping[time_key]), str(row.id)

    state = state or {}
    mark = _key(state.get("mark"))
    late = timedelta(seconds=max(late_s, 0.0))
    known: dict[Key, bytes | None] = {}  # keys of the re-check span, with their digests
    if mark is None:
        rows = rows_after(newest=True, limit=first)
        fresh, more = rows, False
        # Rows older than a full backfill are skipped, not late: the floor sits on the
        # oldest row read, and the re-check covers only keys above it. An empty stream
        # marks the epoch: whatever comes later is new, and read whole.
        floor = key(rows[0]) if rows and len(rows) >= first else None
    else:
        seen = _unpack(state.get("seen"))
        rows = rows_after(after=mark, limit=limit)
        more = len(rows) >= limit
        lowest = (mark[0] - late, "")
        floor = max(lowest, _key(state.get("floor")) or lowest)
        for i, t in keys_between(floor[0], mark[0]):
            k = (utc(t), str(i))
            if floor < k <= mark:
                known[k] = _digest(k)
        missed = [k for k, d in known.items() if d not in seen]
        late_rows = []
        if missed:
            for k in missed:
                del known[k]
            # A row changed again since its key was read (a label updated after the
            # mark) is left to the next pass, which reads it after the mark or re-checks it.
            late_rows = [r for r in rows_after(ids=sorted({i for _, i in missed}))
                         if floor < key(r) <= mark]  # fmt: skip
        fresh = sorted([*late_rows, *rows], key=key)
        known.update((key(r), None) for r in late_rows)
    known.update((key(r), None) for r in rows)
    new_mark = max((key(r) for r in rows), default=mark or (_EPOCH, ""))
    lowest = (new_mark[0] - late, "")
    cut = max(lowest, floor or lowest)
    recent = sorted((k for k in known if k > cut), reverse=True)
    if len(recent) > MAX_SEEN:
        cut = recent[MAX_SEEN]  # the newest key left out: the re-check stops there
        recent = recent[:MAX_SEEN]
    seen_now = sorted(known[k] or _digest(k) for k in recent)
    next_state = {"mark": _pack_key(new_mark), "floor": _pack_key(cut), "seen": _pack(seen_now)}
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
        at=utc(r.at),
        labelled_at=utc(r.labelled_at),
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
        at=utc(r.at),
        model_version=int(r.model_version),
        variant=r.variant,
        predicted=r.predicted,
        confidence=float(r.confidence),
        probabilities=r.probabilities,
        input_stats=r.input_stats,
        segments=segment_values(r, segments),
    )


def _digest(k: Key) -> bytes:
    text = f"{k[1]}\x00{to_us(k[0])}".encode("utf-8", "surrogatepass")
    return hashlib.blake2b(text, digest_size=_DIGEST).digest()


def _pack(digests: list[bytes]) -> str:
    return base64.b64encode(b"".join(digests)).decode("ascii")


def _unpack(text: str | None) -> set[bytes]:
    raw = base64.b64decode(text) if text else b""
    return {raw[i : i + _DIGEST] for i in range(0, len(raw), _DIGEST)}


def _pack_key(k: Key) -> list[str]:
    return [k[0].isoformat(), k[1]]


def _key(value: list[str] | None) -> Key | None:
    return (utc(datetime.fromisoformat(value[0])), value[1]) if value else None

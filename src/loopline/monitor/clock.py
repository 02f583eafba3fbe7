"""The loop's clock: now, and times made aware UTC (the stores may hand back naive ones).

One place for ``loop``, ``retrain`` and ``store.loops``, so that every time they compare
is aware UTC: SQLite returns naive datetimes, PostgreSQL aware ones.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import overload

__all__ = ["now", "parse", "utc"]


def now() -> datetime:
    """The current time, aware UTC."""
    return datetime.now(UTC)


@overload
def utc(ts: datetime) -> datetime: ...
@overload
def utc(ts: None) -> None: ...
def utc(ts: datetime | None) -> datetime | None:
    """``ts`` as aware UTC (a naive time is taken as UTC); None stays None."""
    if ts is None:
        return None
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def parse(value: str) -> datetime:
    """An ISO-8601 time (as the loop's state and timeline store them), aware UTC."""
    return utc(datetime.fromisoformat(value.replace("Z", "+00:00")))

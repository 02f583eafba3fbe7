"""Time as Loopline compares it: aware UTC (SQLite hands back naive datetimes, PostgreSQL
aware ones), and exact integer microseconds for compact JSON state.

A neutral module, so that drivers (the stores) and the monitor share it without either
importing the other.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import overload

__all__ = ["from_us", "now", "parse", "to_us", "utc"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)


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


def to_us(value: datetime) -> int:
    """Integer microseconds since the epoch (exact; compact in JSON)."""
    return (utc(value) - _EPOCH) // _US


def from_us(us: int) -> datetime:
    """The aware UTC time of ``to_us``."""
    return _EPOCH + us * _US

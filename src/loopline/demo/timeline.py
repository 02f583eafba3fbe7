"""The demo's timeline: what happened when, in seconds since the demo began.

Every part of the story (the steps the demo runs, the monitor's passes, the loop, the
deployment's history) marks its events here from its own thread; the live display shows
them as they come, the report and ``--json`` read them at the end.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

# Kinds the report marks on its accuracy plot.
MARKED = ("drift", "warning", "alert", "canary", "redeploy")


class Clock:
    """Seconds since the demo began, from the monotonic clock; store times converted."""

    def __init__(self) -> None:
        self.start_mono = time.monotonic()
        self.start_wall = datetime.now(UTC)

    def __call__(self) -> float:
        return time.monotonic() - self.start_mono

    def at(self, when: datetime | str | None) -> float | None:
        """A store time (aware, or naive UTC, or ISO-8601) in demo seconds."""
        if when is None:
            return None
        if isinstance(when, str):
            when = datetime.fromisoformat(when.replace("Z", "+00:00"))
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return (when - self.start_wall).total_seconds()


@dataclass
class Event:
    """One thing that happened: ``t`` demo seconds, a ``kind`` and words for people.

    A ``quiet`` event (a notify-only loop, an alert resolved because its version retired)
    is kept in the timeline but not shown live.
    """

    t: float
    kind: str
    text: str
    data: dict[str, Any] = field(default_factory=dict)
    quiet: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"t": round(self.t, 3), "kind": self.kind, "text": self.text, **self.data}


class Timeline:
    """Events in the order they were marked; listeners hear each one (the display)."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._events: list[Event] = []
        self._lock = threading.Lock()
        self._listeners: list[Callable[[Event], None]] = []

    def listen(self, fn: Callable[[Event], None]) -> None:
        self._listeners.append(fn)

    def mark(
        self, kind: str, text: str, *, t: float | None = None, quiet: bool = False, **data: Any
    ) -> Event:
        event = Event(self.clock() if t is None else t, kind, text, data, quiet)
        with self._lock:
            self._events.append(event)
        for fn in self._listeners:
            fn(event)
        return event

    def events(self) -> list[Event]:
        with self._lock:
            return sorted(self._events, key=lambda e: e.t)

    def first(self, kind: str, **match: Any) -> Event | None:
        for event in self.events():
            if event.kind == kind and all(event.data.get(k) == v for k, v in match.items()):
                return event
        return None

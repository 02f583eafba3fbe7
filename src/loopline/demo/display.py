"""The live timeline: a progress display of the story, the traffic, and the latest events.

``LiveDisplay`` redraws (rich ``Live``) a progress bar over the story's stages, one line of
traffic figures, one of the monitor's latest measurements, what runs now (a build step,
a replica test, the loop's wait) and the newest events. On a console that is not a
terminal (a pipe, a test) it prints one plain line per event instead.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from loopline.demo.timeline import Event
from loopline.demo.traffic import TrafficStats

STYLES = {
    "drift": "yellow",
    "warning": "yellow",
    "alert": "bold red",
    "canary": "cyan",
    "promoted": "bold green",
    "redeploy": "bold green",
    "recovered": "bold green",
    "error": "red",
    "stage": "bold",
}


def clock_text(t: float) -> str:
    minutes, seconds = divmod(max(0.0, t), 60)
    return f"{int(minutes):02d}:{seconds:04.1f}"


class _StepProgress:
    def __init__(self, display: LiveDisplay, label: str, total: int | None) -> None:
        self.display, self.label, self.total, self.done = display, label, total, 0

    def advance(self, n: int = 1) -> None:
        self.done += n
        of = f"/{self.total}" if self.total else ""
        self.display.activity(f"{self.label} {self.done}{of}")

    def close(self) -> None:
        pass


class BuildReporter:
    """A pipeline reporter that shows the running step (and its progress) as the activity."""

    def __init__(self, display: LiveDisplay, prefix: str) -> None:
        self.display, self.prefix = display, prefix

    def step_started(self, step: str) -> None:
        self.display.activity(f"{self.prefix}: {step}")

    def step_finished(self, step: str, status: str, seconds: float, note: str = "") -> None:
        self.display.activity(f"{self.prefix}: {step} {status} in {seconds:.1f} s")

    def log(self, step: str, message: str) -> None:
        self.display.activity(f"{self.prefix}: {step}: {message}")

    def progress(self, step: str, total: int | None, description: str) -> _StepProgress:
        return _StepProgress(self.display, f"{self.prefix}: {step}: {description}", total)


class LiveDisplay:
    """The demo's console output; thread-safe (events come from the monitor's thread)."""

    def __init__(
        self,
        console: Console,
        stages: list[str],
        *,
        traffic: Callable[[], TrafficStats | None] | None = None,
        monitor: Callable[[], str] | None = None,
        live: bool | None = None,
        events_shown: int = 12,
    ) -> None:
        self.console = console
        self.stages = stages
        self.traffic = traffic or (lambda: None)
        self.monitor = monitor or (lambda: "")
        self.live = console.is_terminal if live is None else live
        self._events: deque[Event] = deque(maxlen=events_shown)
        self._activity = ""
        self._lock = threading.Lock()
        self._progress = Progress(
            TextColumn("[bold]loopline demo[/bold]"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=console,
        )
        self._task = self._progress.add_task("starting", total=len(stages))
        self._live: Live | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> LiveDisplay:
        if self.live:
            self._live = Live(
                console=self.console,
                get_renderable=self._render,
                refresh_per_second=4,
                transient=False,
            )
            self._live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)
            self._live = None

    # -- what the story tells it -----------------------------------------------------------
    def stage(self, name: str) -> None:
        """The story reached stage ``name`` (one of ``stages``)."""
        index = self.stages.index(name) + 1 if name in self.stages else None
        with self._lock:
            if index is not None:
                self._progress.update(self._task, completed=index, description=name)
        if not self.live:
            self.console.print(
                f"[{index or '-'}/{len(self.stages)}] {escape(name)}", highlight=False
            )

    def event(self, e: Event) -> None:
        if e.quiet:
            return
        with self._lock:
            self._events.append(e)
        if not self.live:
            self.console.print(self._event_line(e), highlight=False, soft_wrap=True)

    def activity(self, text: str) -> None:
        with self._lock:
            self._activity = text

    def reporter(self, prefix: str) -> BuildReporter:
        return BuildReporter(self, prefix)

    # -- drawing ---------------------------------------------------------------------------
    def _event_line(self, e: Event) -> Text:
        # Live, an event is one line (cut at the console's width); printed, it is whole.
        line = Text(f"  {clock_text(e.t)}  ", no_wrap=self.live, overflow="ellipsis")
        line.append(f"{e.kind:<9}", style=STYLES.get(e.kind, "dim"))
        line.append(" " + e.text)
        return line

    def _render(self) -> RenderableType:
        with self._lock:
            events = list(self._events)
            activity = self._activity
        parts: list[RenderableType] = [self._progress]
        stats = self.traffic()
        if stats is not None:
            parts.append(Text(traffic_line(stats), style="bold"))
        monitor = self.monitor()
        if monitor:
            parts.append(Text(monitor, no_wrap=True, overflow="ellipsis"))
        if activity:
            parts.append(Text(f"now: {activity}", style="dim", no_wrap=True, overflow="ellipsis"))
        parts.append(Text(""))
        parts.extend(self._event_line(e) for e in events)
        return Group(*parts)


def traffic_line(stats: TrafficStats) -> str:
    """One line of traffic figures: frames, labels, rolling accuracy, who answers."""
    acc = f"{stats.accuracy:.0%}" if stats.accuracy is not None else "n/a"
    total = sum(stats.versions.values()) or 1
    serving = ", ".join(f"v{v} {n / total:.0%}" for v, n in stats.versions.items()) or "none"
    line = (
        f"traffic: {stats.requests:,} frames, {stats.labelled:,} labelled, accuracy (last "
        f"labelled) {acc}, answered by {serving}, conditions: {stats.condition}"
    )
    if stats.errors:
        line += f", {stats.errors} errors"
    return line

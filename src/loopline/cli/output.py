"""How the CLI shows things: rich tables and progress for people, JSON for scripts.

Text that comes from users or data (paths, names, errors, logs, metadata values) is never
read as rich markup: it goes through ``escape`` in a markup string, or ``Text`` in a table,
so ``[x]`` in a path stays ``[x]`` and ``[/x]`` cannot break the output.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

console = Console()
err_console = Console(stderr=True)


def print_error(err: BaseException) -> None:
    """``error: MESSAGE`` on stderr, on one line, the message printed exactly as it is."""
    err_console.print(
        Text.assemble(("error:", "red"), " ", str(err)), highlight=False, soft_wrap=True
    )


def cell(value: Any) -> Text:
    """A table cell showing ``value`` literally (no markup, no highlighting)."""
    return Text("" if value is None else str(value))


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


class _Bar:
    def __init__(self, progress: Progress, task: Any) -> None:
        self._progress = progress
        self._task = task

    def advance(self, n: int = 1) -> None:
        self._progress.advance(self._task, n)

    def close(self) -> None:
        self._progress.remove_task(self._task)


class _Quiet:
    def advance(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


class RichReporter:
    """Shows a run step by step: a line per step (ran, cached, failed) and progress bars."""

    def __init__(self, quiet: bool = False, verbose: bool = False) -> None:
        self.quiet = quiet
        self.verbose = verbose
        self.out = err_console if quiet else console
        self._progress = Progress(
            TextColumn("  [cyan]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.out,
            transient=True,
            disable=quiet or not self.out.is_terminal,
        )

    def __enter__(self) -> RichReporter:
        self._progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._progress.stop()

    def step_started(self, step: str) -> None:
        pass

    def step_finished(self, step: str, status: str, seconds: float, note: str = "") -> None:
        if self.quiet:
            return
        style = {"succeeded": "green", "cached": "blue", "failed": "red"}.get(status, "white")
        label = {"succeeded": "ran", "cached": "skipped (cached)"}.get(status, status)
        extra = f" [dim]{escape(note)}[/dim]" if note else ""
        self.out.print(
            f"[{style}]✔[/{style}] {step:<9} {label} in {seconds:.1f}s{extra}"
            if status != "failed"
            else f"[red]✘ {step:<9} failed[/red]{extra}"
        )

    def log(self, step: str, message: str) -> None:
        if not self.quiet:
            self.out.print(f"  [dim]{step}:[/dim] {escape(message)}", highlight=False)

    def progress(self, step: str, total: int | None, description: str) -> Any:
        if self._progress.disable:
            return _Quiet()
        return _Bar(self._progress, self._progress.add_task(description, total=total))

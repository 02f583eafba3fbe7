"""Steps and pipelines: plain functions wired into a DAG by the names of what they exchange."""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol


class Progress(Protocol):
    def advance(self, n: int = 1) -> None: ...

    def close(self) -> None: ...


class Reporter(Protocol):
    """Where a run reports what it does; the CLI shows it with rich."""

    def step_started(self, step: str) -> None: ...

    def step_finished(self, step: str, status: str, seconds: float, note: str = "") -> None: ...

    def log(self, step: str, message: str) -> None: ...

    def progress(self, step: str, total: int | None, description: str) -> Progress: ...


class _NullProgress:
    def advance(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


class SilentReporter:
    """A reporter that shows nothing (library use, tests)."""

    def step_started(self, step: str) -> None:
        pass

    def step_finished(self, step: str, status: str, seconds: float, note: str = "") -> None:
        pass

    def log(self, step: str, message: str) -> None:
        pass

    def progress(self, step: str, total: int | None, description: str) -> Progress:
        return _NullProgress()


@dataclass
class StepContext:
    """What a running step may use besides its inputs: its run, a log, progress, resources."""

    run_id: str
    step: str
    reporter: Reporter
    resources: Any = None
    record_trial: Callable[..., None] = lambda *a, **k: None
    lines: list[str] = field(default_factory=list)

    def log(self, message: str) -> None:
        self.lines.append(message)
        self.reporter.log(self.step, message)

    def progress(self, total: int | None, description: str) -> Progress:
        return self.reporter.progress(self.step, total, description)


@dataclass(frozen=True)
class Step:
    """A plain function ``func(ctx, *, <inputs>, params)`` returning its outputs.

    With one output the function returns the value; with several, a dict by output name.
    ``halt`` looks at the outputs (fresh or from cache) and returns a reason to stop the
    pipeline there, e.g. a gate that rejected the candidate.
    """

    name: str
    func: Callable[..., Any]
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    params: str | None = None
    version: str = "1"
    # Extra cache inputs computed at run time (e.g. which model is in production now).
    cache_extra: Callable[[Any], str] | None = None
    halt: Callable[[dict[str, Any]], str | None] | None = None

    @property
    def code_version(self) -> str:
        """Hash of the step's module source and explicit version: code changes bust the cache."""
        h = hashlib.sha256(self.version.encode())
        module = inspect.getmodule(self.func)
        try:
            src = inspect.getsource(module) if module is not None else ""
        except (OSError, TypeError):
            src = getattr(self.func, "__qualname__", self.name)
        h.update(src.encode())
        return h.hexdigest()


class Pipeline:
    """An ordered DAG of steps; order is derived from inputs and outputs."""

    def __init__(self, name: str, steps: Iterable[Step]) -> None:
        self.name = name
        self.steps = _toposort(list(steps))

    def __iter__(self) -> Any:
        return iter(self.steps)

    def until(self, name: str) -> Pipeline:
        """The steps up to and including ``name``: a pipeline that stops there."""
        names = [s.name for s in self.steps]
        if name not in names:
            raise KeyError(f"no step {name!r} in pipeline {self.name}; steps: {', '.join(names)}")
        return Pipeline(f"{self.name}[..{name}]", self.steps[: names.index(name) + 1])

    def step(self, name: str) -> Step:
        for s in self.steps:
            if s.name == name:
                return s
        raise KeyError(name)


def _toposort(steps: list[Step]) -> list[Step]:
    producer: dict[str, str] = {}
    for s in steps:
        for out in s.outputs:
            if out in producer:
                raise ValueError(f"output {out!r} is produced by {producer[out]} and {s.name}")
            producer[out] = s.name
    for s in steps:
        for inp in s.inputs:
            if inp not in producer:
                raise ValueError(f"step {s.name} needs {inp!r}, which no step produces")
    done: list[Step] = []
    placed: set[str] = set()
    pending = list(steps)
    while pending:
        ready = [s for s in pending if all(producer[i] in placed for i in s.inputs)]
        if not ready:
            raise ValueError("pipeline has a cycle: " + ", ".join(s.name for s in pending))
        for s in ready:
            done.append(s)
            placed.add(s.name)
            pending.remove(s)
    return done

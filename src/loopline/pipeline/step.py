"""Steps and pipelines: plain functions wired into a DAG by the names of what they exchange."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import BaseModel, ValidationError

from loopline.errors import PipelineError
from loopline.pipeline.code import code_digest, module_file


class Progress(Protocol):
    def advance(self, n: int = 1) -> None: ...

    def close(self) -> None: ...


class Reporter(Protocol):
    """Where a run reports what it does; the CLI shows it with rich."""

    def step_started(self, step: str) -> None: ...

    def step_finished(self, step: str, status: str, seconds: float, note: str = "") -> None: ...

    def log(self, step: str, message: str) -> None: ...

    def progress(self, step: str, total: int | None, description: str) -> Progress: ...


class Recorder(Protocol):
    """Writes what outputs mean to the metadata store (a dataset version, a model version).

    The runner calls it after every step, fresh or cached, before a halt is checked, so a
    step only returns values and never writes metadata itself.
    """

    def step_done(self, run_id: str, step: str, values: Mapping[str, Any]) -> None: ...


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
    """What a running step may use besides its inputs: its run, a log, progress, resources.

    ``cache_extra`` is what the step's ``cache_extra`` returned for this run, the very value
    its cache key holds: a step that depends on something read at run time (the production
    model) uses that instead of reading it again, which could give a different answer.
    """

    run_id: str
    step: str
    reporter: Reporter
    resources: Any = None
    record_trial: Callable[..., None] = lambda *a, **k: None
    lines: list[str] = field(default_factory=list)
    cache_extra: str = ""

    def log(self, message: str) -> None:
        self.lines.append(message)
        self.reporter.log(self.step, message)

    def progress(self, total: int | None, description: str) -> Progress:
        return self.reporter.progress(self.step, total, description)


@dataclass(frozen=True)
class Step:
    """A plain function ``func(ctx, *, <inputs>, params)`` returning its outputs.

    With one output the function returns the value; with several, a dict by output name.
    ``params`` declares the config keys the step reads, and only those reach it (see
    ``select_params``); ``params_type`` validates them into the model the function gets.
    ``code_modules`` names further modules the step runs given its params (a user's model
    class), hashed into its code version. ``cache_extra(ctx, params)`` adds what else the
    output depends on, read at run time (the data source's content, the production model);
    the function finds the same value in ``ctx.cache_extra``.
    ``halt`` looks at the outputs (fresh or from cache) and returns a reason to stop the
    pipeline there, e.g. a gate that rejected the candidate.
    """

    name: str
    func: Callable[..., Any]
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    params: tuple[str, ...] = ()
    params_type: type[BaseModel] | None = None
    version: str = "1"
    code_modules: Callable[[Any], Iterable[str]] | None = None
    cache_extra: Callable[[Any, Any], str] | None = None
    halt: Callable[[dict[str, Any]], str | None] | None = None

    @property
    def code_version(self) -> str:
        """Hash of the code the step runs whatever its params (see ``loopline.pipeline.code``)."""
        return self.code_version_for(None)

    def code_version_for(self, params: Any) -> str:
        """Hash of the step's module, what it imports, the Loopline version and explicit
        version, plus the ``code_modules`` it names for ``params``."""
        from loopline import __version__

        module = inspect.getmodule(self.func)
        name = getattr(module, "__name__", None)
        if name is None or module_file(name) is None:
            # No source to read (an interactive session): the function's name stands in.
            seeds: list[str] = []
            parts = [self.version, __version__, getattr(self.func, "__qualname__", self.name)]
        else:
            seeds = [name]
            parts = [self.version, __version__]
        follow = {"loopline", *(s.split(".")[0] for s in seeds)}
        if self.code_modules is not None and params is not None:
            extra = sorted(self.code_modules(params))
            seeds += extra
            follow |= {m.split(".")[0] for m in extra}
        return code_digest(seeds, follow, *parts)

    def select_params(self, config: Mapping[str, Any]) -> Any:
        """The step's params from ``config``: only its declared keys, validated.

        A key naming a section (a mapping) passes that section's fields; any other dotted
        key passes its one value under its last part's name: ``("train", "data.labels")``
        gives the train fields plus ``labels``. Returns ``params_type`` built from them,
        the plain dict without a type, or None when the step declares no params.
        """
        if not self.params:
            return None
        merged: dict[str, Any] = {}
        for key in self.params:
            node: Any = config
            for part in key.split("."):
                if not isinstance(node, Mapping) or part not in node:
                    raise PipelineError(f"step {self.name} reads {key!r}, which the config lacks")
                node = node[part]
            fields = dict(node) if isinstance(node, Mapping) else {key.rpartition(".")[2]: node}
            clash = sorted(set(fields) & set(merged))
            if clash:
                raise PipelineError(
                    f"step {self.name}: params {', '.join(self.params)} both give {clash[0]!r}"
                )
            merged.update(fields)
        if self.params_type is None:
            return merged
        try:
            return self.params_type.model_validate(merged)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise PipelineError(f"step {self.name} params: {where}: {first['msg']}") from None


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

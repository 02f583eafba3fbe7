"""What the engine needs from the stores it is handed, as structural types.

The engine imports no driver (STYLE.md, principle 2): these Protocols name the few
repository methods it calls, so mypy checks that ``MetadataStore`` and ``ArtifactStore``
fit without the engine depending on them. Records come back as rows whose attributes the
engine reads (``status``, ``cache_key``, ``outputs``...), typed ``Any`` here.
"""

from __future__ import annotations

from typing import Any, Protocol


class RunRecords(Protocol):
    def create(
        self,
        run_id: str,
        *,
        pipeline: str,
        project: str,
        config: dict[str, Any],
        trigger: str = "manual",
        trigger_ref: str | None = None,
        git_commit: str | None = None,
    ) -> Any: ...

    def update(self, run_id: str, **fields: Any) -> None: ...

    def get(self, run_id: str) -> Any: ...

    def claim(self, run_id: str) -> Any: ...


class StepRecords(Protocol):
    def start(
        self,
        run_id: str,
        step: str,
        *,
        cache_key: str,
        code_version: str,
        params: dict[str, Any] | None = None,
        inputs: dict[str, Any] | None = None,
        cached: bool = False,
        cached_from: str | None = None,
    ) -> int: ...

    def finish(
        self,
        step_id: int,
        *,
        status: str,
        outputs: dict[str, Any] | None = None,
        log: str | None = None,
        error: str | None = None,
        duration_s: float | None = None,
    ) -> None: ...

    def find_cached(self, step: str, cache_key: str) -> Any: ...

    def for_run(self, run_id: str) -> list[Any]: ...


class TrialRecords(Protocol):
    def record(
        self,
        run_id: str,
        number: int,
        *,
        state: str,
        params: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
        value: float | None = None,
        epochs: int = 0,
        duration_s: float | None = None,
    ) -> None: ...


class AuditRecords(Protocol):
    def record(self, actor: str, action: str, subject: str, **details: Any) -> None: ...


class RunStore(Protocol):
    """The metadata the engine writes: runs, their steps and trials, and the audit log."""

    @property
    def runs(self) -> RunRecords: ...

    @property
    def steps(self) -> StepRecords: ...

    @property
    def trials(self) -> TrialRecords: ...

    @property
    def audit(self) -> AuditRecords: ...


class BlobStore(Protocol):
    """Content-addressed bytes: step outputs are written and read by sha256."""

    def put_bytes(self, data: bytes) -> Any: ...

    def get_bytes(self, digest: str) -> bytes: ...

    def exists(self, digest: str) -> bool: ...

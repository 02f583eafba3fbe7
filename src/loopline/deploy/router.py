"""Routing between the versions a server holds, in process, before their batchers.

Each loaded version is a ``Lane``: its model and its own ``Batcher``. A ``RoutingTable``
says how requests split between the lanes of one deployment generation: ``direct`` (all
to the stable version), ``canary`` (a share to the candidate, sticky per camera) or
``shadow`` (answers from the stable version, a mirror to the candidate off the request
path). A table never changes once built: the reconciler builds the next one and swaps it
in with one attribute assignment, so a request reads one consistent table and the hot path
takes no lock. Shares are precomputed as thresholds; counters are plain attributes written
on the event loop thread only (the reconciler reads them).

A canary's failure that is not the client's fault is counted against the candidate and
the request is answered again by the stable version, so no client sees it; a client's
mistake (a bad image) is answered as it is and counts against nobody.

A request to an explicit version (``/versions/{v}/...``, a replica test's, say) is answered
by that version or not at all: it is tagged ``addressed`` and counted apart (``addressed``,
``addressed_errors``), so it is neither canary nor shadow traffic to the canary's judge.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from random import random
from typing import TYPE_CHECKING, Any

import numpy as np

from loopline.deploy.runtime import Overloaded
from loopline.errors import InvalidInput, LooplineError, NotFound

if TYPE_CHECKING:
    from loopline.deploy.runtime import Batcher, JobResult, ServedModel
    from loopline.drivers.metadata.deployments import DeploymentState

log = logging.getLogger("loopline.deploy")

DIRECT, CANARY, SHADOW = "direct", "canary", "shadow"
STABLE = "stable"  # the variant of an answer from the stable version
ADDRESSED = "addressed"  # the variant of an answer to a request naming its version
LATENCY_WINDOW = 2048  # recent latencies kept per version, for its p95
_HASH_SPACE = 1 << 64


class NotReady(LooplineError):
    """The server holds no version to answer with yet (503)."""

    status_code = 503


class Tagged(dict[str, Any]):
    """Request metadata carrying the routing decision, for the prediction log's rows."""

    __slots__ = ("variant", "generation")

    variant: str
    generation: int | None


class Lane:
    """One loaded version: its model and its own batcher."""

    __slots__ = ("served", "batcher", "version", "retired")

    def __init__(self, served: ServedModel, batcher: Batcher) -> None:
        self.served = served
        self.batcher = batcher
        self.version = served.version
        self.retired = False  # set just before its batcher stops

    @property
    def input_shape(self) -> list[int]:
        return self.served.runtime.input_shape


class VersionStats:
    """What one version did since its table was taken (the format of ``canary.py``)."""

    __slots__ = (
        "requests", "errors", "fallbacks", "shadow_compared", "shadow_agreed",
        "shadow_errors", "shadow_dropped", "latency", "shadow_latency", "addressed",
        "addressed_errors",
    )  # fmt: skip

    def __init__(self) -> None:
        self.requests = self.errors = self.fallbacks = 0
        self.addressed = self.addressed_errors = 0  # requests naming the version, apart
        self.shadow_compared = self.shadow_agreed = self.shadow_errors = 0
        self.shadow_dropped = 0
        self.latency: deque[float] = deque(maxlen=LATENCY_WINDOW)  # ms
        self.shadow_latency: deque[float] = deque(maxlen=LATENCY_WINDOW)

    def snapshot(self) -> dict[str, Any]:
        """The counters and p95s now (safe from another thread: copies are atomic)."""
        return {
            "requests": self.requests,
            "errors": self.errors,
            "fallbacks": self.fallbacks,
            "p95_ms": _p95(self.latency.copy()),
            "shadow_compared": self.shadow_compared,
            "shadow_agreed": self.shadow_agreed,
            "shadow_errors": self.shadow_errors,
            "shadow_dropped": self.shadow_dropped,
            "shadow_p95_ms": _p95(self.shadow_latency.copy()),
            "addressed": self.addressed,
            "addressed_errors": self.addressed_errors,
        }


def _p95(values: deque[float]) -> float | None:
    return round(float(np.percentile(np.fromiter(values, float), 95)), 3) if values else None


def sticky_bucket(key: Any) -> int:
    """Where a sticky key falls in [0, 2**64): the same in every process and every run."""
    digest = hashlib.blake2b(str(key).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


@dataclass(frozen=True, eq=False)
class RoutingTable:
    """How one deployment generation splits requests between loaded versions."""

    name: str | None
    stable: Lane | None
    candidate: Lane | None = None
    strategy: str = DIRECT
    share: float = 0.0
    threshold: int = 0  # share of the sticky-key hash space that goes to the candidate
    sticky_key: str = "camera_id"
    shadow_max_queue: int = 256
    generation: int | None = None
    environment: str | None = None
    reason: str = "the server is starting"  # why it cannot answer, while stable is None
    deployment: dict[str, Any] | None = None
    lanes: Mapping[str, Lane] = field(default_factory=dict)  # by version, as in URLs
    stats: Mapping[int, VersionStats] = field(default_factory=dict)
    candidate_tensors: bool = False  # the candidate takes the stable version's tensors
    same_labels: bool = True
    taken_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def lane(self, version: str) -> Lane:
        """The loaded version named in a URL (NotFound naming the loaded ones)."""
        lane = self.lanes.get(version)
        if lane is None:
            if self.stable is None:
                raise NotReady(self.reason)
            raise NotFound(
                f"model {self.name!r} has no version {version!r} here; this server serves "
                f"{self.describe()}"
            )
        return lane

    def describe(self) -> str:
        versions = list(self.lanes)
        return ("version " if len(versions) == 1 else "versions ") + ", ".join(versions)

    @property
    def versions(self) -> list[int]:
        return [lane.version for lane in self.lanes.values()]

    def report(self) -> dict[str, Any]:
        """Per-version counters since this table was taken, for the replica's heartbeat."""
        return {
            "since": self.taken_at.isoformat(),
            "strategy": self.strategy,
            "versions": {str(v): s.snapshot() for v, s in self.stats.items()},
        }


def static_table(lane: Lane) -> RoutingTable:
    """One version, always: ``loopline serve MODEL`` and ``--bundle``."""
    return RoutingTable(
        name=lane.served.name,
        stable=lane,
        lanes={str(lane.version): lane},
        stats={lane.version: VersionStats()},
    )


def empty_table(environment: str, reason: str) -> RoutingTable:
    """No version loaded yet: alive, not ready, every predict a 503 saying ``reason``."""
    return RoutingTable(name=None, stable=None, environment=environment, reason=reason)


def deployment_table(
    state: DeploymentState,
    lanes: Mapping[int, Lane],
    *,
    sticky_key: str = "camera_id",
    shadow_max_queue: int = 256,
) -> RoutingTable:
    """The table serving ``state``; ``lanes`` holds every version it needs, by number."""
    assert state.stable_version is not None
    stable = lanes[state.stable_version]
    candidate = lanes.get(state.candidate_version) if state.candidate_version else None
    strategy = state.strategy if candidate is not None else DIRECT
    share = state.candidate_share if candidate is not None else 0.0
    chosen = [stable] + ([candidate] if candidate is not None else [])
    return RoutingTable(
        name=state.model_name,
        stable=stable,
        candidate=candidate,
        strategy=strategy,
        share=share,
        threshold=int(min(max(share, 0.0), 1.0) * _HASH_SPACE),
        sticky_key=sticky_key,
        shadow_max_queue=shadow_max_queue,
        generation=state.generation,
        environment=state.environment,
        deployment={
            "environment": state.environment,
            "generation": state.generation,
            "stable": state.stable_version,
            "candidate": state.candidate_version,
            "strategy": strategy,
            "share": share,
            "status": state.status,
        },
        lanes={str(lane.version): lane for lane in chosen},
        stats={lane.version: VersionStats() for lane in chosen},
        candidate_tensors=candidate is not None and candidate.input_shape == stable.input_shape,
        same_labels=candidate is None or candidate.served.labels == stable.served.labels,
    )


@dataclass(slots=True)
class Routed:
    """An answer and the version that gave it."""

    result: JobResult
    served: ServedModel
    variant: str


class Router:
    """Sends each request to a lane of the current table (``router.table``, swapped whole)."""

    def __init__(self, table: RoutingTable) -> None:
        self.table = table
        self.shadow_in_flight = 0

    async def submit(
        self,
        *,
        images: list[bytes] | None = None,
        tensor: np.ndarray | None = None,
        metadata: dict[str, Any] | None = None,
        source: str = "v1",
        version: str | None = None,
    ) -> Routed:
        """Answer from the version the table picks (or ``version``, as addressed)."""
        table = self.table
        if version is not None:  # that version answers, or nobody: never another one
            lane = table.lane(version)
            return await self._answer(table, lane, ADDRESSED, images, tensor, metadata, source)
        stable = table.stable
        if stable is None:
            raise NotReady(table.reason)
        strategy = table.strategy
        if strategy == DIRECT:
            return await self._answer(table, stable, STABLE, images, tensor, metadata, source)
        candidate = table.candidate
        assert candidate is not None
        if strategy == CANARY and _to_candidate(table, metadata, tensor):
            try:
                return await self._answer(
                    table, candidate, CANARY, images, tensor, metadata, source
                )
            except InvalidInput:
                raise  # the client's mistake: the stable version would refuse it too
            except Exception as err:
                table.stats[candidate.version].fallbacks += 1
                log.debug(
                    "canary %s failed; the stable version answers: %s", candidate.version, err
                )
        routed = await self._answer(table, stable, STABLE, images, tensor, metadata, source)
        if strategy == SHADOW:
            self._mirror(table, stable, candidate, routed.result, images, tensor, metadata, source)
        return routed

    async def _answer(
        self,
        table: RoutingTable,
        lane: Lane,
        variant: str,
        images: list[bytes] | None,
        tensor: np.ndarray | None,
        metadata: dict[str, Any] | None,
        source: str,
    ) -> Routed:
        stats = table.stats[lane.version]
        start = time.perf_counter()
        lane, variant, future = self._submit(table, lane, variant, images, tensor, metadata, source)
        try:
            result = await future
        except InvalidInput:
            raise
        except Exception:
            if variant == ADDRESSED:
                stats.addressed += 1
                stats.addressed_errors += 1
            else:
                stats.requests += 1
                stats.errors += 1
            raise
        if variant == ADDRESSED:
            stats.addressed += 1
        else:
            stats.requests += 1
            stats.latency.append((time.perf_counter() - start) * 1000.0)
        return Routed(result, lane.served, variant)

    def _submit(
        self,
        table: RoutingTable,
        lane: Lane,
        variant: str,
        images: list[bytes] | None,
        tensor: np.ndarray | None,
        metadata: dict[str, Any] | None,
        source: str,
    ) -> tuple[Lane, str, asyncio.Future[JobResult]]:
        meta = metadata
        if table.environment is not None:  # static servers log rows as they always did
            meta = _tag(metadata, variant, table.generation)
        try:
            future = lane.batcher.submit(images=images, tensor=tensor, metadata=meta, source=source)
        except Overloaded:
            if not lane.retired:
                raise
            # The table changed under this request and the lane is stopping: the new table
            # was in place before it stopped, so one of its lanes takes the job.
            now = self.table
            again, variant = _successor(now, lane, variant)
            if again.retired:
                raise
            if now.environment is not None:
                meta = _tag(metadata, variant, now.generation)
            future = again.batcher.submit(
                images=images, tensor=tensor, metadata=meta, source=source
            )
            return again, variant, future
        return lane, variant, future

    def _mirror(
        self,
        table: RoutingTable,
        stable: Lane,
        candidate: Lane,
        answer: JobResult,
        images: list[bytes] | None,
        tensor: np.ndarray | None,
        metadata: dict[str, Any] | None,
        source: str,
    ) -> None:
        """Send a copy of an answered request to the shadow candidate; never wait for it."""
        if table.share < 1.0 and random() >= table.share:
            return
        stats = table.stats[candidate.version]
        if (tensor is not None and not table.candidate_tensors) or (
            self.shadow_in_flight >= table.shadow_max_queue
        ):
            stats.shadow_dropped += 1
            return
        meta = Tagged(metadata) if metadata else Tagged()
        meta.variant = SHADOW
        meta.generation = table.generation
        try:
            future = candidate.batcher.submit(
                images=images, tensor=tensor, metadata=meta, source=source
            )
        except Overloaded:
            stats.shadow_dropped += 1
            return
        self.shadow_in_flight += 1
        stable_labels = None if table.same_labels else stable.served.labels
        future.add_done_callback(
            partial(
                self._shadow_done, stats, answer.top, stable_labels, candidate, time.perf_counter()
            )
        )

    def _shadow_done(
        self,
        stats: VersionStats,
        stable_top: np.ndarray,
        stable_labels: list[str] | None,
        candidate: Lane,
        start: float,
        future: asyncio.Future[JobResult],
    ) -> None:
        self.shadow_in_flight -= 1
        if future.cancelled():
            return
        if future.exception() is not None:
            stats.shadow_errors += 1
            return
        top = future.result().top
        if stable_labels is None:
            agreed = int(np.count_nonzero(top == stable_top))
        else:
            labels = candidate.served.labels
            agreed = sum(
                labels[c] == stable_labels[s]
                for c, s in zip(top.tolist(), stable_top.tolist(), strict=True)
            )
        stats.shadow_compared += len(top)
        stats.shadow_agreed += agreed
        stats.shadow_latency.append((time.perf_counter() - start) * 1000.0)


def _tag(metadata: dict[str, Any] | None, variant: str, generation: int | None) -> Tagged:
    meta = Tagged(metadata) if metadata else Tagged()
    meta.variant = variant
    meta.generation = generation
    return meta


def _successor(now: RoutingTable, lane: Lane, variant: str) -> tuple[Lane, str]:
    """The lane of table ``now`` that takes a job its retired ``lane`` refused, and its
    variant. A request that named its version is answered by that version or refused
    (404 naming the versions loaded now); a routed one keeps its canary when the new
    table still runs it, else the stable version answers."""
    if variant == ADDRESSED:
        return now.lane(str(lane.version)), ADDRESSED  # NotFound / NotReady when gone
    same = now.lanes.get(str(lane.version))
    if variant == CANARY and now.strategy == CANARY and same is not None and same is now.candidate:
        return same, CANARY
    if now.stable is None:
        raise NotReady(now.reason)
    return now.stable, STABLE


def _to_candidate(
    table: RoutingTable, metadata: dict[str, Any] | None, tensor: np.ndarray | None
) -> bool:
    """Whether a request goes to the canary: by its sticky key when given, else at random."""
    if tensor is not None and not table.candidate_tensors:
        return False
    if metadata:
        key = metadata.get(table.sticky_key)
        if key is not None:
            return sticky_bucket(key) < table.threshold
    return random() < table.share

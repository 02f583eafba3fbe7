"""Keeping a server process serving its environment's desired state, as a controller would.

Every ``reconcile_interval_s`` a thread reads the environment's deployment from the
metadata store. When its generation changed, it loads each version the new state needs
and does not hold yet (the bundle fetched and sha256-verified, an ONNX Runtime session and
a batcher of its own), swaps the router's table in one assignment, and stops the batchers
of the versions no longer needed a moment later (a stopping batcher answers what it
holds). A version that cannot be loaded leaves the current table serving; the error is
reported and the load tried again at the next interval. A candidate (canary or shadow)
that fails to load ``CANDIDATE_LOAD_ATTEMPTS`` intervals in a row is removed from the
deployment (compare-and-set on the generation it saw, action ``auto-rollback``), since no
replica can ever judge it; a stable version that cannot load is only reported. Every
interval the thread also reports what this process serves
(``store.deployments.report_replica``, with per-version counters since it took the
current generation) and, while a canary runs, judges it (``canary.act``; compare-and-set
makes concurrent replicas safe). A store that cannot be reached is logged and tried again:
it never stops the server. The store is opened (its schema checked, migrated if needed)
by the thread too, with backoff, so a server started during a store outage comes up alive
and not ready, and serves once the store answers.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loopline.deploy import canary
from loopline.deploy.router import CANARY, Lane, Router, deployment_table, empty_table
from loopline.deploy.runtime import ModelRuntime, ServedModel
from loopline.drivers.metadata.database import safe_url
from loopline.drivers.metadata.deployments import DeploymentConflict
from loopline.errors import IntegrityError

if TYPE_CHECKING:
    from loopline.deploy.settings import ServeSettings
    from loopline.drivers.metadata.deployments import DeploymentState
    from loopline.drivers.metadata.store import MetadataStore
    from loopline.environments import EnvironmentConfig

log = logging.getLogger("loopline.deploy")

RETIRE_AFTER_S = 1.0  # a replaced version's batcher stops this long after the swap
CANDIDATE_LOAD_ATTEMPTS = 3  # intervals in a row a candidate may fail to load
OPEN_BACKOFF_MAX_S = 10.0  # the longest wait between two tries to open the store


def waiting_reason(environment: str) -> str:
    return (
        f"environment {environment} has no model deployed yet: promote one with "
        f"`loopline promote NAME:VERSION --to {environment}`"
    )


def load_version(
    store: MetadataStore, artifacts_url: str, name: str, version: int, settings: ServeSettings
) -> ServedModel:
    """Fetch, verify (sha256 of the tar, then the manifest) and load ``name:version``."""
    from loopline.bundle import fetch_bundle
    from loopline.drivers.artifacts.store import ArtifactStore

    mv = store.models.get(name, version)
    with tempfile.TemporaryDirectory(prefix="loopline-serve-") as tmp:
        try:
            bundle = fetch_bundle(ArtifactStore(artifacts_url), mv.bundle_sha256, Path(tmp))
        except IntegrityError as err:
            raise IntegrityError(f"refusing to serve {name}:{version}: {err}") from None
        runtime = ModelRuntime(
            bundle.model_path,
            bundle.labels,
            bundle.preprocess,
            intra_op_threads=settings.intra_op_threads,
            inter_op_threads=settings.inter_op_threads,
        )
    return ServedModel(name, version, bundle, mv.bundle_sha256, runtime)


class Reconciler:
    """The thread that keeps ``router`` serving ``environment``'s deployment.

    ``load(name, version)`` returns a started ``Lane`` for a version (it may raise).
    ``store`` may be down: the thread opens it (``store.migrate``) before anything else.
    """

    def __init__(
        self,
        router: Router,
        store: MetadataStore,
        environment: str,
        env: EnvironmentConfig,
        load: Callable[[str, int], Lane],
        *,
        endpoint: str | None = None,
        interval_s: float | None = None,
    ) -> None:
        self.router = router
        self.store = store
        self.environment = environment
        self.env = env
        self.load = load
        self.endpoint = endpoint
        self.interval_s = interval_s or env.reconcile_interval_s
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.error: str | None = None
        self._loaded: dict[tuple[str, int], Lane] = {}
        self._retiring: list[tuple[float, tuple[str, int], Lane]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._logged: dict[str, str | None] = {}
        self.store_open = False
        self.open_failures = 0  # tries to open the store that failed, in a row
        self._open_at = 0.0  # time.monotonic() of the next try
        self._candidate_failures: tuple[tuple[int, int], int] = ((0, 0), 0)

    @property
    def replica_id(self) -> str:
        return f"{self.host}:{self.pid}"

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        """Run the first interval here, before the server answers, then the thread: a
        worker (re)started under load never answers "loading" while its store and bundles
        are fine, and one whose store is down comes up alive and not ready all the same."""
        self.pid = os.getpid()  # the worker's, when started in a worker process
        self._stop.clear()
        self._step_safely()
        self._thread = threading.Thread(target=self._run, name="loopline-reconcile", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """End the thread, stop every batcher (each answers what it holds), sign off."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        lanes = [lane for _, _, lane in self._retiring] + list(self._loaded.values())
        self._retiring, self._loaded = [], {}
        for lane in lanes:
            lane.retired = True
            lane.batcher.stop()
        if not self.store_open:  # never reported: nothing to remove
            return
        try:
            self.store.deployments.remove_replica(self.environment, self.replica_id)
        except Exception as err:  # the store is down: the row ages out of the status
            log.warning("cannot remove replica %s from the store: %s", self.replica_id, err)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._step_safely()

    def _step_safely(self) -> None:
        try:
            self.step()
        except Exception:  # never let one bad interval end the thread
            log.exception("reconcile step failed")

    # -- one interval ------------------------------------------------------------------
    def step(self) -> None:
        """Open the store if it is not yet; read the desired state, converge to it,
        report, judge a canary."""
        self._stop_retired()
        if not self._open_store():
            return
        try:
            state = self.store.deployments.get(self.environment)
        except Exception as err:
            self._note("store", f"cannot read deployment {self.environment}: {_line(err)}")
            return
        self._note("store", None)
        table = self.router.table
        if state is None or state.stable_version is None or state.model_name is None:
            if table.stable is None and self.error is None:
                reason = waiting_reason(self.environment)
                if table.reason != reason:
                    self.router.table = empty_table(self.environment, reason)
            # else: a deployment that vanished leaves the current versions serving
        elif state.generation != table.generation:
            self._apply(state)
        self._report()
        table = self.router.table
        if table.strategy == CANARY and state is not None and state.generation == table.generation:
            try:
                new, verdict = canary.act(self.store, self.environment, self.env)
            except Exception as err:
                self._note("canary", f"cannot judge the canary: {_line(err)}")
            else:
                self._note("canary", None)
                if new is not None:
                    log.info(
                        "canary of %s: %s (%s)", self.environment, verdict.action, verdict.reason
                    )

    def _apply(self, state: DeploymentState) -> None:
        name = state.model_name
        assert name is not None
        needed = [(name, v) for v in state.versions]
        for key in needed:
            if key in self._loaded:
                continue
            lane = self._unretire(key)
            if lane is None:
                try:
                    lane = self.load(*key)
                except Exception as err:
                    error = _line(err)
                    self._failed(state, f"cannot load {key[0]}:{key[1]}: {error}")
                    stable_loaded = (name, state.stable_version) in self._loaded
                    if key[1] == state.candidate_version and stable_loaded:
                        self._candidate_failed(state, error)
                    return
            self._loaded[key] = lane
        self._candidate_failures = ((0, 0), 0)
        lanes = {v: self._loaded[(name, v)] for v in state.versions}
        self.router.table = deployment_table(  # the swap: one assignment
            state,
            lanes,
            sticky_key=self.env.canary.sticky_key,
            shadow_max_queue=self.env.shadow.max_queue,
        )
        deadline = time.monotonic() + max(RETIRE_AFTER_S, self.interval_s)
        for key in [k for k in self._loaded if k not in needed]:
            lane = self._loaded.pop(key)
            lane.retired = True
            self._retiring.append((deadline, key, lane))
        if self.error is not None:
            log.info("environment %s: serving again", self.environment)
        self.error = None
        cand = state.ref(state.candidate_version)
        log.info(
            "environment %s: serving %s (generation %d%s)",
            self.environment,
            state.ref(state.stable_version),
            state.generation,
            f", {state.strategy} {cand} at {state.candidate_share:g}" if cand else "",
        )
        self._set_status(state, "healthy")

    def _failed(self, state: DeploymentState, message: str) -> None:
        if message != self.error:
            log.error(
                "environment %s, generation %d: %s", self.environment, state.generation, message
            )
        self.error = message
        table = self.router.table
        if table.stable is None:
            self.router.table = empty_table(
                self.environment,
                f"environment {self.environment} serves nothing yet: {message} (retrying; "
                f"fix it or `loopline promote` another version --to {self.environment})",
            )
        self._set_status(state, "degraded" if table.stable is not None else "failed")

    def _candidate_failed(self, state: DeploymentState, error: str) -> None:
        """Count a failed load of the candidate; remove it once it failed too often."""
        version = state.candidate_version
        assert version is not None
        key = (state.generation, version)
        seen, count = self._candidate_failures
        count = count + 1 if seen == key else 1
        self._candidate_failures = (key, count)
        if count < CANDIDATE_LOAD_ATTEMPTS:
            return
        reason = f"{state.ref(version)} cannot be loaded: {error}"
        try:
            new = self.store.deployments.change(
                self.environment,
                expected_generation=state.generation,
                action="auto-rollback",
                actor="loopline (canary)",
                reason=reason,
                candidate_version=None,
                strategy="direct",
                candidate_share=0.0,
                candidate_since=None,
                status="pending",
            )
        except DeploymentConflict:  # another replica (or a person) changed it first
            return
        except Exception as err:
            self._note("rollback", f"cannot remove candidate {state.ref(version)}: {_line(err)}")
            return
        self._note("rollback", None)
        log.warning(
            "environment %s: removed candidate %s after %d failed loads (generation %d): %s",
            self.environment, state.ref(version), count, new.generation, error,
        )  # fmt: skip
        self._apply(new)

    def _open_store(self) -> bool:
        """Whether the store is open: opened (and migrated) now if due, with backoff."""
        if self.store_open:
            return True
        now = time.monotonic()
        if now < self._open_at:
            return False
        try:
            self.store.migrate()
        except Exception as err:
            self.open_failures += 1
            delay = self.interval_s * 2 ** min(self.open_failures - 1, 16)
            self._open_at = now + min(OPEN_BACKOFF_MAX_S, delay)
            where = safe_url(self.store.url)
            message = _line(err)
            if where not in message:
                message = f"cannot open the metadata store at {where}: {message}"
            if self.open_failures == 1:  # once per outage, not every try
                log.warning("environment %s: %s (retrying with backoff)", self.environment, message)
            reason = (
                f"{message} (retrying; environment {self.environment} serves nothing until "
                "it can read its deployment)"
            )
            if self.router.table.stable is None and self.router.table.reason != reason:
                self.router.table = empty_table(self.environment, reason)
            return False
        if self.open_failures:
            log.info(
                "environment %s: the metadata store is open (after %d failed tries)",
                self.environment, self.open_failures,
            )  # fmt: skip
        self.store_open = True
        self.open_failures = 0
        return True

    def _set_status(self, state: DeploymentState, status: str) -> None:
        if state.status == status:
            return
        try:
            self.store.deployments.set_status(self.environment, state.generation, status)
        except Exception as err:
            self._note("status", f"cannot record status {status}: {_line(err)}")

    def _unretire(self, key: tuple[str, int]) -> Lane | None:
        for i, (_, k, lane) in enumerate(self._retiring):
            if k == key:
                del self._retiring[i]
                lane.retired = False
                return lane
        return None

    def _stop_retired(self) -> None:
        now = time.monotonic()
        due = [item for item in self._retiring if item[0] <= now]
        if not due:
            return
        self._retiring = [item for item in self._retiring if item[0] > now]
        for _, key, lane in due:
            lane.batcher.stop()
            log.info("environment %s: stopped %s:%s", self.environment, *key)

    def _report(self) -> None:
        table = self.router.table
        try:
            self.store.deployments.report_replica(
                self.environment,
                self.replica_id,
                generation=table.generation or 0,
                versions=table.versions,
                status="error" if self.error else "ok",
                endpoint=self.endpoint,
                host=self.host,
                pid=self.pid,
                error=self.error,
                stats={**table.report(), "shadow_in_flight": self.router.shadow_in_flight},
            )
        except Exception as err:
            self._note("report", f"cannot report replica {self.replica_id}: {_line(err)}")
        else:
            self._note("report", None)

    def _note(self, what: str, message: str | None) -> None:
        """Log a trouble once when it starts and once when it ends, not every interval."""
        before = self._logged.get(what)
        if message == before:
            return
        self._logged[what] = message
        if message is not None:
            log.warning("environment %s: %s (retrying)", self.environment, message)
        elif before is not None:
            log.info("environment %s: %s works again", self.environment, what)


def _line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def replica_endpoint(settings: ServeSettings) -> str:
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    return f"http://{host}:{settings.port}"


def environment_base(env: EnvironmentConfig) -> dict[str, Any]:
    """The ServeSettings an environment sets: its capture policy, then host, port, token
    and its ``serve`` fields."""
    from loopline.deploy.capture import capture_overrides

    return {**capture_overrides(env.capture), **env.serve_overrides()}

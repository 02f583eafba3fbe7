"""Serving an environment (``loopline serve --env ENV``): its settings, store and state.

Where ``server.create_app`` serves one model version, ``server.create_env_app`` serves
whatever the environment's deployment in the metadata store says, followed by a
reconciler thread (``deploy/reconcile.py``) with in-process routing between the versions
it holds (``deploy/router.py``): one stable endpoint across releases, no proxy hop. This
module builds what that app holds.

The store is not contacted here: the reconciler opens it (with backoff), so a server
started during a store outage is alive and not ready instead of exiting. Request, log and
capture metrics are labelled by the model the environment serves once a version of it is
loaded (batch metrics by each version).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, cast

from loopline.deploy.auth import BearerAuth
from loopline.deploy.capture import CaptureWriter, capture_writer
from loopline.deploy.lanes import make_batcher, prediction_log
from loopline.deploy.metrics import ServerMetrics
from loopline.deploy.reconcile import Reconciler, environment_base, load_version, replica_endpoint
from loopline.deploy.router import Lane, Router, empty_table
from loopline.deploy.runtime import ServedModel
from loopline.deploy.settings import ServeSettings
from loopline.deploy.state import ServerState

if TYPE_CHECKING:
    from loopline.drivers.metadata.store import MetadataStore
    from loopline.environments import EnvironmentConfig


def environment_state(
    environment: str,
    env: EnvironmentConfig,
    settings: ServeSettings,
    store: MetadataStore,
    artifacts_url: str,
    *,
    spill_dir: Path | None = None,
) -> tuple[ServerState, Reconciler]:
    """What the app of ``environment`` holds, and the reconciler that keeps it current
    (started and stopped with the app)."""
    metrics = ServerMetrics("", "", [])  # request counters; batches per version below
    predlog = prediction_log(settings, store, metrics, spill_dir)
    # Capture counters are labelled by the model alone: the versions change under them.
    identity = cast(ServedModel, SimpleNamespace(name="", version=""))
    capture = capture_writer(identity, settings, store, metrics)
    if isinstance(capture, CaptureWriter):
        capture.environment = environment
    router = Router(empty_table(environment, f"environment {environment} is loading"))

    def load(name: str, version: int) -> Lane:
        served = load_version(store, artifacts_url, name, version, settings)
        view = metrics.for_version(name, version, served.labels)
        lane = Lane(served, make_batcher(served, settings, view, predlog, environment))
        lane.batcher.start()
        metrics.relabel(name)  # request and log counters: the model served from now on
        if isinstance(capture, CaptureWriter):
            capture.relabel((name, ""))
        return lane

    reconciler = Reconciler(
        router, store, environment, env, load, endpoint=replica_endpoint(settings)
    )
    state = ServerState(
        settings=settings,
        router=router,
        metrics=metrics,
        auth=BearerAuth(settings.tokens()),
        predlog=predlog,
        capture=capture,
        store=store if predlog is not None else None,
        environment=environment,
    )
    return state, reconciler


def open_environment(
    environment: str, config: Path | None, settings: ServeSettings
) -> tuple[EnvironmentConfig, MetadataStore, str]:
    """The environment's config, its metadata store and its artifact store URL.

    The store is not contacted (nor migrated) here: the reconciler opens it, retrying with
    backoff while it cannot be reached. A URL that cannot name a store fails at once.
    """
    from loopline.config import load_config, require_project
    from loopline.credentials import expand_url
    from loopline.drivers.metadata.store import MetadataStore

    require_project(config, metadata_url=settings.metadata_url)
    cfg = load_config(config)
    env = cfg.environment(environment)
    url = settings.metadata_url or (
        expand_url(env.metadata_url, f"environments.{environment}.metadata_url")
        if env.metadata_url
        else cfg.metadata_url()
    )
    if settings.capture and settings.artifacts_url is None:  # captured images go there
        settings.artifacts_url = cfg.artifacts_url()
    return env, MetadataStore(url, migrate=False), cfg.artifacts_url()


def environment_settings(config: Path | None, environment: str) -> dict[str, Any]:
    """What an environment of the config sets in ServeSettings (host, port, token, ...)."""
    from loopline.config import load_config, require_project

    require_project(config)
    return environment_base(load_config(config).environment(environment))

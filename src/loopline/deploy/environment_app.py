"""The app serving an environment (``loopline serve --env ENV``).

Where ``create_app`` serves one model version, this app serves whatever the environment's
deployment in the metadata store says, followed by a reconciler thread
(``deploy/reconcile.py``) with in-process routing between the versions it holds
(``deploy/router.py``): one stable endpoint across releases, no proxy hop.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, cast

from fastapi import FastAPI

from loopline.deploy.auth import BearerAuth
from loopline.deploy.capture import CaptureWriter, capture_writer
from loopline.deploy.metrics import ServerMetrics
from loopline.deploy.reconcile import Reconciler, environment_base, load_version, replica_endpoint
from loopline.deploy.router import Lane, Router, empty_table
from loopline.deploy.runtime import ServedModel
from loopline.deploy.server import ModelSource, _assemble, _prediction_log, make_batcher
from loopline.deploy.settings import ServeSettings
from loopline.deploy.state import ServerState

if TYPE_CHECKING:
    from loopline.drivers.metadata.store import MetadataStore
    from loopline.environments import EnvironmentConfig


def create_env_app(
    environment: str,
    env: EnvironmentConfig,
    settings: ServeSettings,
    store: MetadataStore,
    artifacts_url: str,
    *,
    spill_dir: Path | None = None,
) -> FastAPI:
    """The app serving ``environment``: whatever its deployment in ``store`` says, followed
    by a reconciler thread (``deploy/reconcile.py``), with in-process routing between the
    versions it holds. Alive but not ready until a stable version is loaded."""
    try:
        deployed = store.deployments.get(environment)
    except Exception:  # the store is down at start: the reconciler keeps trying
        deployed = None
    model = deployed.model_name if deployed is not None and deployed.model_name else ""
    metrics = ServerMetrics(model, "", [])  # request counters; batches per version below
    predlog = _prediction_log(settings, store, metrics, spill_dir)
    # Capture counters are labelled by the model alone: the versions change under them.
    identity = cast(ServedModel, SimpleNamespace(name=model, version=""))
    capture = capture_writer(identity, settings, store, metrics)
    if isinstance(capture, CaptureWriter):
        capture.environment = environment
    router = Router(empty_table(environment, f"environment {environment} is loading"))

    def load(name: str, version: int) -> Lane:
        served = load_version(store, artifacts_url, name, version, settings)
        view = metrics.for_version(name, version, served.labels)
        lane = Lane(served, make_batcher(served, settings, view, predlog, environment))
        lane.batcher.start()
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
    banner = f"serving environment {environment} as replica {reconciler.replica_id}"
    app = _assemble(
        state, reconciler.start, reconciler.stop, f"Serving environment {environment}", banner
    )
    app.state.reconciler = reconciler
    return app


def open_environment(
    source: ModelSource, settings: ServeSettings
) -> tuple[EnvironmentConfig, MetadataStore, str]:
    """The environment's config, its metadata store (opened) and its artifact store URL."""
    from loopline.config import load_config, require_project
    from loopline.credentials import expand_url
    from loopline.drivers.metadata.store import MetadataStore

    assert source.env is not None
    require_project(source.config, metadata_url=settings.metadata_url)
    cfg = load_config(source.config)
    env = cfg.environment(source.env)
    url = settings.metadata_url or (
        expand_url(env.metadata_url, f"environments.{source.env}.metadata_url")
        if env.metadata_url
        else cfg.metadata_url()
    )
    if settings.capture and settings.artifacts_url is None:  # captured images go there
        settings.artifacts_url = cfg.artifacts_url()
    return env, MetadataStore(url), cfg.artifacts_url()


def environment_settings(config: Path | None, environment: str) -> dict[str, Any]:
    """What an environment of the config sets in ServeSettings (host, port, token, ...)."""
    from loopline.config import load_config, require_project

    require_project(config)
    return environment_base(load_config(config).environment(environment))

"""The prediction server: a FastAPI app over one verified model bundle, run by uvicorn.

``create_app`` builds the app for a loaded model; ``load_model`` resolves a registry
reference (``NAME``, ``NAME:VERSION``, ``NAME@ALIAS``) or a bundle folder/tar, verifies it
(the registered sha256 of the tar, then every file against the bundle's manifest) and loads
it into ONNX Runtime; ``serve`` does both and runs uvicorn. The container image runs::

    python -m loopline.deploy.server --bundle /bundle --host 0.0.0.0 --port 8080

Its flags are those of ``loopline serve`` (one parser, ``settings.build_parser``). Client
mistakes become a JSON 4xx ``{"error": "..."}``; nothing here imports torch.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from loopline import __version__
from loopline.bundle import Bundle, extract_bundle, fetch_bundle, load_bundle
from loopline.deploy import oip, openapi, v1
from loopline.deploy.auth import BearerAuth, Unauthorized
from loopline.deploy.capture import capture_writer
from loopline.deploy.capture_routes import add_routes as add_capture_routes
from loopline.deploy.environment_app import (
    environment_settings,
    environment_state,
    open_environment,
)
from loopline.deploy.lanes import make_batcher, prediction_log
from loopline.deploy.limits import BodyLimitMiddleware
from loopline.deploy.metrics import (
    MetricsMiddleware,
    ServerMetrics,
    multiprocess_dir,
    prepare_multiprocess_dir,
)
from loopline.deploy.router import Lane, Router, static_table
from loopline.deploy.runtime import ModelRuntime, ServedModel
from loopline.deploy.settings import ServeSettings, build_parser, load_settings, setting_options
from loopline.deploy.state import ServerState
from loopline.digest import sha256_file
from loopline.errors import ConfigError, IntegrityError, InvalidInput, LooplineError, NotFound

if TYPE_CHECKING:
    from loopline.drivers.metadata.store import MetadataStore
    from loopline.environments import EnvironmentConfig

log = logging.getLogger("loopline.deploy")


# -- loading -------------------------------------------------------------------------------------
@dataclass
class ModelSource:
    """Where the model comes from: a registry reference, or a bundle folder or tar."""

    ref: str | None = None
    bundle: Path | None = None
    config: Path | None = None
    name: str | None = None  # overrides for a bundle outside the registry
    version: int | None = None
    env: str | None = None  # an environment of the config: its deployment, followed


def load_model(source: ModelSource, settings: ServeSettings) -> tuple[ServedModel, Any]:
    """Verify and load the model; also open the metadata store when the log is on.

    Returns the served model and the store (or None). Raises LooplineError with a clear
    message when the model is unknown or its bundle does not verify.
    """
    from loopline.config import load_config, require_project
    from loopline.drivers.metadata.store import MetadataStore

    if (source.ref is None) == (source.bundle is None):
        raise ConfigError("give either a model reference (NAME[:VERSION|@ALIAS]) or --bundle")
    if source.ref is not None:  # a registry to read: never create an empty one here
        require_project(source.config, metadata_url=settings.metadata_url)
    cfg = load_config(source.config)
    url = settings.metadata_url or cfg.metadata_url()
    if settings.capture and settings.artifacts_url is None:  # captured images go there
        settings.artifacts_url = cfg.artifacts_url()
    store = None
    # A private folder per start, removed once the model is in memory: a registered bundle
    # is verified from its tar every time, never trusted from an earlier extraction.
    with tempfile.TemporaryDirectory(prefix="loopline-serve-") as tmp:
        if source.ref is not None:
            from loopline.drivers.artifacts.store import ArtifactStore

            store = MetadataStore(url)
            mv = store.models.resolve(source.ref)
            name, version, digest = mv.name, mv.version, mv.bundle_sha256
            try:
                bundle = fetch_bundle(ArtifactStore(cfg.artifacts_url()), digest, Path(tmp))
            except IntegrityError as err:
                raise IntegrityError(f"refusing to serve {name}:{version}: {err}") from None
        else:
            assert source.bundle is not None
            bundle, digest = _open_bundle(Path(source.bundle), Path(tmp))
            meta = bundle.metadata
            name = (
                source.name
                or os.environ.get("LOOPLINE_MODEL_NAME")
                or meta.get("model_name")
                or meta.get("name")
                or "model"
            )
            if settings.log_predictions or settings.capture:
                store = MetadataStore(url)
            name, version = _bundle_identity(source, settings, bundle, digest, str(name), store)
        runtime = ModelRuntime(
            bundle.model_path,
            bundle.labels,
            bundle.preprocess,
            intra_op_threads=settings.intra_op_threads,
            inter_op_threads=settings.inter_op_threads,
        )
    return ServedModel(str(name), int(version), bundle, digest, runtime), store


def _open_bundle(path: Path, tmp: Path) -> tuple[Bundle, str]:
    if not path.exists():
        raise NotFound(f"bundle {path} does not exist")
    try:
        if path.is_file():
            digest = sha256_file(path)
            return load_bundle(extract_bundle(path, tmp / digest)), digest
        return load_bundle(path), sha256_file(path / "MANIFEST.json")
    except IntegrityError as err:
        raise IntegrityError(f"refusing to serve bundle {path}: {err}") from None


def _bundle_identity(
    source: ModelSource,
    settings: ServeSettings,
    bundle: Bundle,
    digest: str,
    name: str,
    store: Any | None,
) -> tuple[str, int]:
    """A bare bundle's registry identity (``deploy/identity.py``), looked up by sha256 in
    the project's store when there is one."""
    from loopline.config import load_config, require_project
    from loopline.deploy.identity import bundle_identity
    from loopline.drivers.metadata.store import MetadataStore

    assert source.bundle is not None
    env_version = os.environ.get("LOOPLINE_MODEL_VERSION")
    lookup, opened = store, None
    if lookup is None and source.version is None and not env_version:
        try:  # a project at hand: never create an empty store just to look in it
            require_project(source.config, metadata_url=settings.metadata_url)
        except ConfigError:
            pass
        else:
            url = settings.metadata_url or load_config(source.config).metadata_url()
            lookup = opened = MetadataStore(url)
    try:
        return bundle_identity(
            bundle, Path(source.bundle), digest, name=name, version=source.version,
            env_version=env_version, store=lookup,
        )  # fmt: skip
    finally:
        if opened is not None:
            opened.close()


# -- the app ---------------------------------------------------------------------------------------
def create_app(
    served: ServedModel,
    settings: ServeSettings | None = None,
    store: Any | None = None,
    *,
    spill_dir: Path | None = None,
) -> FastAPI:
    """The FastAPI app serving ``served``; predictions are logged to ``store`` if given."""
    settings = settings or ServeSettings()
    metrics = ServerMetrics(served.name, served.version, served.labels)
    predlog = prediction_log(settings, store, metrics, spill_dir)
    capture = capture_writer(served, settings, store, metrics)  # production capture
    lane = Lane(served, make_batcher(served, settings, metrics, predlog))
    state = ServerState(
        settings=settings,
        router=Router(static_table(lane)),
        metrics=metrics,
        auth=BearerAuth(settings.tokens()),
        predlog=predlog,
        capture=capture,
        store=store if predlog is not None else None,
    )

    def stop() -> None:
        lane.retired = True
        lane.batcher.stop()

    banner = f"serving {served.name}:{served.version} ({served.bundle_sha256[:12]})"
    return _assemble(
        state, lane.batcher.start, stop, f"Serving {served.name}:{served.version}", banner
    )


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
    by a reconciler thread, with in-process routing between the versions it holds
    (``deploy/environment_app.py``). Alive but not ready until a stable version is loaded."""
    state, reconciler = environment_state(
        environment, env, settings, store, artifacts_url, spill_dir=spill_dir
    )
    banner = f"serving environment {environment} as replica {reconciler.replica_id}"
    app = _assemble(
        state, reconciler.start, reconciler.stop, f"Serving environment {environment}", banner
    )
    app.state.reconciler = reconciler
    return app


def _assemble(
    state: ServerState,
    start: Callable[[], None],
    stop: Callable[[], None],
    summary: str,
    banner: str,
) -> FastAPI:
    """The app around ``state``: lifespan, routes, error handlers, metrics and limits.

    ``start`` and ``stop`` bring the model side up and down (its batchers, the reconciler).
    """
    settings, metrics, predlog = state.settings, state.metrics, state.predlog
    capture = state.capture
    if settings.require_token_for_predict and not settings.tokens():
        raise ConfigError("require_token_for_predict is set but no token is configured")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if predlog is not None:
            predlog.start()
        capture.start()
        start()
        state.accepting = True
        log.info("%s", banner)
        try:
            yield
        finally:
            # uvicorn has answered every in-flight request by now; drain and write the log.
            state.accepting = False
            await asyncio.to_thread(stop)
            await asyncio.to_thread(capture.stop)
            if predlog is not None:
                await asyncio.to_thread(predlog.close)

    app = FastAPI(
        title="Loopline prediction server", version=__version__, summary=summary,
        lifespan=lifespan,
    )  # fmt: skip
    app.state.loopline = state
    openapi.install(app)
    _add_error_handlers(app)
    v1.add_routes(app, state)  # the hot routes first: routing tries them in order
    oip.add_routes(app, state)
    add_capture_routes(app, state)

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics")
    async def prometheus() -> Response:
        if predlog is not None:
            metrics.set_log_pending(predlog.pending)
        return Response(metrics.render(), media_type=metrics.content_type)

    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # outermost: counts 413s too
    return app


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps({"error": message}),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(LooplineError)
    async def loopline_error(request: Request, err: LooplineError) -> Response:
        status = getattr(err, "status_code", None)
        if status is None:
            status = (
                404 if isinstance(err, NotFound) else 400 if isinstance(err, InvalidInput) else 500
            )
        headers = None
        if isinstance(err, Unauthorized):
            headers = {"WWW-Authenticate": "Bearer"}
        elif status == 503:
            headers = {"Retry-After": "1"}
        if status >= 500:
            log.error("%s %s: %s", request.method, request.url.path, err)
        return _error(status, str(err), headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> Response:
        message = err.detail if isinstance(err.detail, str) else str(err.detail)
        if err.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        elif err.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        return _error(err.status_code, message, dict(err.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> Response:
        return _error(400, f"invalid request: {err.errors()[0].get('msg', err)}")

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return _error(500, "internal server error (logged on the server)")


# -- running ---------------------------------------------------------------------------------------
_WORKER_SOURCE = "LOOPLINE_SERVE_SOURCE"
WORKER_APP = "loopline.deploy.server:worker_app"  # what each worker process imports
DESCRIPTION = (
    "Serve a registered model (MODEL) or a bundle (--bundle) over HTTP until Ctrl-C or "
    "SIGTERM; a graceful stop loses no prediction.\n\n"
    "MODEL is NAME, NAME:VERSION or NAME@ALIAS (e.g. vehicles@production). The bundle is "
    "verified against its registered sha256 and its manifest before the model is loaded.\n\n"
    "--env ENV serves an environment of loopline.yaml instead: whatever its deployment in "
    "the metadata store says (loopline promote, loopline rollback), followed within its "
    "reconcile interval, with canary and shadow routing inside the server.\n\n"
    "Endpoints: Open Inference Protocol v2 under /v2 (KServe and Triton clients work as they "
    "are); JPEG/PNG images at POST /v1/models/NAME/predict; ground truth at POST /v1/feedback "
    "(needs a bearer token: set LOOPLINE_SERVE_TOKEN); Prometheus metrics at /metrics; the "
    "OpenAPI document at /openapi.json. Every prediction is logged to the metadata store.\n\n"
    "Every setting can also be set as LOOPLINE_SERVE_<SETTING>, e.g. "
    "LOOPLINE_SERVE_MAX_BATCH_SIZE=16. See docs/serving.md."
)


def serve(source: ModelSource, settings: ServeSettings, *, log_level: str = "info") -> None:
    """Verify and load the model, then run uvicorn until SIGTERM/SIGINT (graceful)."""
    import uvicorn

    # Loopline's own messages at the chosen level; other libraries' (Alembic's INFO lines
    # while it migrates the store, say) only from WARNING. uvicorn configures its own.
    level = logging.getLevelName(log_level.upper())
    logging.basicConfig(
        level=max(level, logging.WARNING), format="%(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("loopline").setLevel(level)
    # Fail fast, with a clear message, before binding the port (and before forking workers).
    if source.env is not None:
        env, store, artifacts_url = open_environment(source.env, source.config, settings)
    else:
        served, store = load_model(source, settings)
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "loop": "uvloop",
        "http": "httptools",
        "access_log": False,
        "log_level": log_level,
        "backlog": 2048,
        "timeout_graceful_shutdown": 30,
    }
    if settings.workers == 1:
        if multiprocess_dir() is not None:  # set by the user: an earlier run's values go
            prepare_multiprocess_dir()
        if source.env is not None:
            app = create_env_app(source.env, env, settings, store, artifacts_url)
        else:
            app = create_app(served, settings, store)
        uvicorn.run(app, **options)
        return
    # Several processes share the port; each loads (and verifies) the model itself.
    if store is not None:
        store.close()
    metrics_dir, owned = prepare_multiprocess_dir()
    os.environ.update(settings.to_env())
    os.environ[_WORKER_SOURCE] = orjson.dumps(
        {k: str(v) if isinstance(v, Path) else v for k, v in source.__dict__.items()}
    ).decode()
    from loopline.deploy.workers import run_workers

    try:
        run_workers(settings.workers, options, WORKER_APP)
    finally:
        if owned:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def worker_app() -> FastAPI:
    """App factory for worker processes (``--workers N``): settings come from the environment."""
    raw: dict[str, Any] = orjson.loads(os.environ[_WORKER_SOURCE])
    for key in ("bundle", "config"):
        if raw.get(key):
            raw[key] = Path(raw[key])
    source = ModelSource(**raw)
    settings = load_settings()
    if source.env is not None:  # each worker follows the environment on its own
        env, store, artifacts_url = open_environment(source.env, source.config, settings)
        return create_env_app(source.env, env, settings, store, artifacts_url)
    served, store = load_model(source, settings)
    return create_app(served, settings, store)


def make_settings(
    options: dict[str, Any],
    token_file: Path | None = None,
    base: dict[str, Any] | None = None,
) -> ServeSettings:
    """Settings from ``base`` (an environment's), then the process environment, with flags
    (``options``, None = unset) on top."""
    overrides = dict(options)
    if token_file is not None:
        try:
            overrides["token"] = token_file.read_text().strip()
        except OSError as err:
            raise ConfigError(f"cannot read --token-file {token_file}: {err}") from None
    return load_settings(overrides, base=base)


def main(argv: list[str] | None = None, prog: str = "python -m loopline.deploy.server") -> int:
    """The command line of ``python -m loopline.deploy.server`` and ``loopline serve``."""
    args = build_parser(prog, DESCRIPTION).parse_args(argv)
    try:
        given = [args.model is not None, args.bundle is not None, args.env is not None]
        if sum(given) != 1:
            raise ConfigError(
                "give exactly one of MODEL (NAME[:VERSION|@ALIAS]), --bundle PATH or --env ENV"
            )
        base = environment_settings(args.config, args.env) if args.env is not None else None
        settings = make_settings(setting_options(args), args.token_file, base)
        source = ModelSource(
            ref=args.model,
            bundle=args.bundle,
            config=args.config,
            name=args.model_name,
            version=args.model_version,
            env=args.env,
        )
        serve(source, settings, log_level=args.log_level)
    except LooplineError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())

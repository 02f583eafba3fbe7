"""The edge hub: what edge agents follow, and where they report.

``Hub`` is the library API (the HTTP app and the MQTT subscriber both call it):

* ``deployment(env)``: the environment's stable model, version, bundle sha256 and
  generation, read from the metadata store (a promotion needs no hub restart);
* ``bundle_file(sha256, envs)``: the bundle tar from the artifact store (verified on the
  way, and its cached copy again whenever that file changed), only for a version one of
  ``envs`` deploys;
* ``record_report(env, report, via)``: a heartbeat with telemetry into ``store.devices``
  (and the device as a replica of the environment, so ``loopline status`` sees it);
* ``record_predictions(env, upload)``: the device's prediction log into
  ``store.predictions`` (ids already stored are skipped: an upload may be repeated).

Run it with ``loopline hub --env ENV`` (or ``python -m loopline.edge.hub``). Every HTTP
endpoint but the health check needs the environment's token (``environments.ENV.token``);
MQTT messages are trusted as far as the broker's own authentication and ACLs go.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from loopline.deploy.auth import BearerAuth, Unauthorized
from loopline.deploy.limits import BodyLimitMiddleware, RequestRejected, json_body
from loopline.digest import sha256_file
from loopline.edge import protocol
from loopline.edge.reports import PredictionUpload, Report, prediction_rows
from loopline.errors import ConfigError, InvalidInput, LooplineError, NotFound

if TYPE_CHECKING:
    from loopline.config import Config
    from loopline.drivers.metadata.store import MetadataStore

log = logging.getLogger("loopline.edge")

MAX_BODY_BYTES = 32 << 20


class Hub:
    """The hub of one or more edge environments of a project."""

    def __init__(
        self,
        config: Config,
        environments: list[str],
        store: MetadataStore,
        *,
        cache_dir: Path | None = None,
        mqtt: bool = True,
    ) -> None:
        from loopline.drivers.artifacts.store import ArtifactStore

        if not environments:
            raise ConfigError("give at least one environment (--env ENV)")
        self.config = config
        self.store = store
        self.envs = {name: config.environment(name) for name in environments}
        self.auth: dict[str, BearerAuth] = {}
        for name, env in self.envs.items():
            raw = env.token_value()
            tokens = [t.strip() for t in (raw or "").split(",") if t.strip()]
            if not tokens:
                raise ConfigError(
                    f"environment {name} has no device token: set environments.{name}.token "
                    "to an environment reference such as ${LOOPLINE_EDGE_TOKEN}"
                )
            self.auth[name] = BearerAuth(tokens)
        self.artifacts = ArtifactStore(config.artifacts_url())
        self.cache_dir = cache_dir or (config.state_dir / "edge" / "bundles")
        self.subscriber: Any = None
        self._verified: dict[str, tuple[int, int, int]] = {}  # sha -> stat of its cached tar
        self._want_mqtt = mqtt

    # -- auth ------------------------------------------------------------------------------
    def require(self, env: str, headers: Any) -> None:
        """404 for an environment this hub does not serve; 401/403 without its token."""
        if env not in self.auth:
            raise NotFound(f"this hub serves {', '.join(self.auth)}, not environment {env!r}")
        self.auth[env].require(headers, f"environment {env}")

    def authorised(self, headers: Any) -> list[str]:
        """The environments whose token the request carries (401 when none)."""
        out, last = [], None
        for env, auth in self.auth.items():
            try:
                auth.require(headers, "the bundle")
                out.append(env)
            except RequestRejected as err:
                last = err
        if not out:
            raise last or Unauthorized("invalid bearer token")
        return out

    # -- what devices read -----------------------------------------------------------------
    def deployment(self, env: str) -> dict[str, Any]:
        dep = self.store.deployments.get(env)
        settings = self.envs[env].edge
        out: dict[str, Any] = {
            "environment": env,
            "generation": dep.generation if dep else 0,
            "model_name": None,
            "version": None,
            "bundle_sha256": None,
            "poll_s": settings.poll_s,
            "heartbeat_s": settings.heartbeat_s,
        }
        if dep is not None and dep.model_name and dep.stable_version is not None:
            mv = self.store.models.get(dep.model_name, dep.stable_version)
            out.update(model_name=mv.name, version=mv.version, bundle_sha256=mv.bundle_sha256)
        return out

    def deployed_bundles(self, envs: list[str]) -> set[str]:
        """The bundle digests of the versions ``envs`` deploy (stable and candidate)."""
        out = set()
        for env in envs:
            dep = self.store.deployments.get(env)
            if dep is None or not dep.model_name:
                continue
            for version in dep.versions:
                out.add(self.store.models.get(dep.model_name, version).bundle_sha256)
        return out

    def bundle_file(self, sha256: str, envs: list[str]) -> Path:
        """A verified local copy of the bundle tar ``sha256`` (NotFound unless deployed)."""
        if not protocol.SHA256.match(sha256):
            raise InvalidInput(f"invalid bundle digest {sha256!r}: expected 64 lowercase hex")
        if sha256 not in self.deployed_bundles(envs):
            raise NotFound(
                f"bundle {sha256[:12]} is not deployed to {', '.join(envs)}; the hub serves "
                "only the bundles of deployed versions"
            )
        path = self.cache_dir / f"{sha256}.tar"
        if path.is_file() and not self._intact(path, sha256):
            log.warning("the cached bundle %s does not match its sha256; fetching it again",
                        sha256[:12])  # fmt: skip
            path.unlink(missing_ok=True)
        if not path.is_file():
            self.artifacts.get_file(sha256, path)  # checks the sha256; appears only whole
            self._intact(path, sha256)
        return path

    def _intact(self, path: Path, sha256: str) -> bool:
        """Whether the cached tar still hashes to its name (re-hashed when its stat changes)."""
        st = path.stat()
        key = (st.st_size, st.st_mtime_ns, st.st_ino)
        if self._verified.get(sha256) == key:
            return True
        if sha256_file(path) != sha256:
            self._verified.pop(sha256, None)
            return False
        self._verified[sha256] = key
        return True

    # -- what devices write ----------------------------------------------------------------
    def record_report(self, env: str, report: Report, *, via: str) -> int:
        devices = self.store.devices
        devices.heartbeat(
            env, report.device_id, model_name=report.model_name, version=report.version,
            status=report.status, host=report.host,
            info={**report.info, "error": report.error, "generation": report.generation,
                  "bundle_sha256": report.bundle_sha256},
            telemetry=report.telemetry, via=via,
        )  # fmt: skip
        samples = [
            {"environment": env, "device_id": report.device_id, "via": via, "at": s.at,
             "model_version": s.version, "metrics": s.metrics}
            for s in report.samples
        ]  # fmt: skip
        devices.record_telemetry(samples)
        self.store.deployments.report_replica(
            env, f"edge:{report.device_id}", generation=report.generation or 0,
            versions=[report.version] if report.version is not None else [],
            status=report.status, endpoint=report.info.get("endpoint"), host=report.host,
            error=report.error, stats={"via": via, **report.telemetry},
        )  # fmt: skip
        return len(samples)

    def record_status(self, env: str, device_id: str, status: str) -> None:
        """An MQTT status message (``offline``: the device's last will)."""
        if status == protocol.STATUS_OFFLINE:
            self.store.devices.set_status(env, device_id, status, via="mqtt")

    def record_predictions(self, env: str, upload: PredictionUpload) -> int:
        rows = prediction_rows(env, upload)
        self.store.predictions.log(rows)
        return len(rows)

    # -- MQTT ------------------------------------------------------------------------------
    def start_mqtt(self) -> None:
        if not self._want_mqtt:
            return
        from loopline.edge.hub_mqtt import Subscriber

        try:
            self.subscriber = Subscriber(self)
        except (ImportError, ValueError) as err:
            log.warning("no MQTT telemetry: %s", err)
            return
        self.subscriber.start()

    def stop_mqtt(self) -> None:
        if self.subscriber is not None:
            self.subscriber.stop()
            self.subscriber = None

    def mqtt_state(self) -> str:
        if self.subscriber is None:
            return "off"
        return "connected" if self.subscriber.connected else "connecting"


# -- the HTTP app ----------------------------------------------------------------------------
def create_hub_app(hub: Hub) -> FastAPI:
    """The hub's FastAPI app; its lifespan runs the MQTT subscriber."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        hub.start_mqtt()
        try:
            yield
        finally:
            hub.stop_mqtt()

    app = FastAPI(title="Loopline edge hub", lifespan=lifespan)
    _add_error_handlers(app)

    @app.get(protocol.HEALTH_PATH)
    def health() -> dict[str, Any]:
        return {"status": "ok", "environments": list(hub.envs), "mqtt": hub.mqtt_state()}

    @app.get("/v1/edge/bundles/{sha256}")
    def bundle(sha256: str, request: Request) -> FileResponse:
        envs = hub.authorised(request.headers)
        path = hub.bundle_file(sha256, envs)
        return FileResponse(path, media_type="application/x-tar",
                            headers={"X-Bundle-Sha256": sha256})  # fmt: skip

    @app.get("/v1/edge/{env}/deployment")
    def deployment(env: str, request: Request) -> dict[str, Any]:
        hub.require(env, request.headers)
        return hub.deployment(env)

    @app.post("/v1/edge/{env}/telemetry")
    async def telemetry(env: str, request: Request) -> dict[str, Any]:
        hub.require(env, request.headers)
        report = _parse(Report, await request.body(), "a device report (JSON)")
        from starlette.concurrency import run_in_threadpool

        n = await run_in_threadpool(hub.record_report, env, report, via="http")
        return {"ok": True, "samples": n}

    @app.post("/v1/edge/{env}/predictions")
    async def predictions(env: str, request: Request) -> dict[str, Any]:
        hub.require(env, request.headers)
        upload = _parse(PredictionUpload, await request.body(), "{device_id, rows: [...]}")
        from starlette.concurrency import run_in_threadpool

        n = await run_in_threadpool(hub.record_predictions, env, upload)
        return {"ok": True, "accepted": n}

    app.add_middleware(BodyLimitMiddleware, max_body_bytes=MAX_BODY_BYTES)
    return app


def _parse(model: Any, body: bytes, expected: str) -> Any:
    data = json_body(body, expected)
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "body"
        raise RequestRejected(f"invalid {where}: {first.get('msg')}; send {expected}") from None


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    import orjson

    return Response(orjson.dumps({"error": message}), status_code=status,
                    media_type="application/json", headers=headers)  # fmt: skip


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(LooplineError)
    async def loopline_error(request: Request, err: LooplineError) -> Response:
        status = getattr(err, "status_code", None) or (
            404 if isinstance(err, NotFound) else 400 if isinstance(err, InvalidInput) else 500
        )
        headers = {"WWW-Authenticate": "Bearer"} if isinstance(err, Unauthorized) else None
        if status >= 500:
            log.error("%s %s: %s", request.method, request.url.path, err)
        return _error(status, str(err), headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> Response:
        message = str(err.detail)
        if err.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        elif err.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        return _error(err.status_code, message)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> Response:
        return _error(400, f"invalid request: {err.errors()[0].get('msg', err)}")

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return _error(500, "internal server error (logged on the hub)")


# -- running ---------------------------------------------------------------------------------
def serve(
    config_path: Path | None,
    environments: list[str],
    *,
    host: str | None = None,
    port: int | None = None,
    log_level: str = "info",
) -> None:
    """Open the store, then run the hub on uvicorn until SIGTERM/SIGINT."""
    import uvicorn

    from loopline.config import load_config, require_project
    from loopline.drivers.metadata.store import MetadataStore

    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    require_project(config_path)
    cfg = load_config(config_path)
    if not environments:
        raise ConfigError("give the environment(s) to serve: --env ENV")
    first = cfg.environment(environments[0])
    store = MetadataStore(cfg.metadata_url())
    try:
        app = create_hub_app(Hub(cfg, environments, store))
        uvicorn.run(app, host=host or first.host, port=port if port is not None else
                    first.edge.hub_port, log_level=log_level, access_log=False)  # fmt: skip
    finally:
        store.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loopline.edge.hub", description=__doc__)
    p.add_argument("--env", action="append", required=True, help="environment (repeatable)")
    p.add_argument("--config", type=Path, help="config file (default ./loopline.yaml)")
    p.add_argument("--host", help="address to bind (default: the environment's host)")
    p.add_argument("--port", type=int, help="port (default: environments.ENV.edge.hub_port)")
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    try:
        serve(args.config, args.env, host=args.host, port=args.port, log_level=args.log_level)
    except LooplineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

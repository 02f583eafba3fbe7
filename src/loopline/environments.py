"""Deployment environments in ``loopline.yaml``: where and how each environment serves.

An environment (``staging`` and ``production`` by default, more allowed) names a target
(``local``, ``container``, ``vm``, ``kubernetes`` or ``edge``) and its settings: the serving
settings (any field of ``loopline.deploy.settings.ServeSettings``, checked at load), the
canary and shadow policies, the replica test a candidate must pass before it is promoted,
production capture, and the target's own settings. For example::

    environments:
      production:
        port: 8080
        serve: {workers: 2, max_batch_size: 8}
        token: ${LOOPLINE_PROD_TOKEN}
        canary: {share: 0.1, min_requests: 500}
      edge-a1:
        target: edge
        edge: {mqtt_url: mqtt://127.0.0.1:1883}

The token is an environment reference (``${NAME}``), expanded only when a server starts;
a literal token in the file is refused, as it would be stored in every run's config.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from loopline.errors import ConfigError

TARGETS = ("local", "container", "vm", "kubernetes", "edge")
Target = Literal["local", "container", "vm", "kubernetes", "edge"]
STRATEGIES = ("direct", "canary", "shadow")
DEFAULT_ENVIRONMENTS = {"staging": {"port": 8081}, "production": {"port": 8080}}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CanaryPolicy(_Section):
    """How a canary runs: its share of requests, and when it is promoted or rolled back."""

    share: float = Field(0.1, gt=0.0, lt=1.0, description="share of requests to the candidate")
    sticky_key: str = Field("camera_id", description="request metadata key that pins a client")
    min_requests: int = Field(200, ge=1, description="healthy requests before auto-promotion")
    max_error_rate: float = Field(0.02, ge=0.0, le=1.0, description="errors/requests to roll back")
    max_p95_ms: float = Field(500.0, gt=0.0, description="candidate p95 latency to roll back")
    min_labels: int = Field(
        30, ge=1, description="labelled candidate predictions to judge accuracy"
    )
    max_accuracy_drop: float = Field(
        0.05, ge=0.0, le=1.0, description="candidate accuracy below stable's by more: roll back"
    )
    auto_promote: bool = Field(True, description="promote by itself once healthy")
    promote_needs_labels: bool = Field(
        True,
        description="promote only once min_labels answers of the candidate have feedback "
        "and its accuracy holds (false: after min_requests alone)",
    )


class ShadowPolicy(_Section):
    """How a shadow runs: the share of production requests mirrored to the candidate."""

    share: float = Field(1.0, gt=0.0, le=1.0)
    max_queue: int = Field(
        256, ge=1, description="mirrored requests waiting at most (then dropped)"
    )


class ReplicaTestPolicy(_Section):
    """What a candidate must pass in the replica before it may be promoted."""

    rules: list[str] | None = Field(
        None, description="metric rules on the test split (default: the gate's rules)"
    )
    max_test_images: int | None = Field(None, ge=1, description="test-split images at most")
    replay: int = Field(200, ge=0, description="recorded production requests to replay at most")
    min_agreement: float = Field(
        0.8, ge=0.0, le=1.0, description="agreement with production on replayed requests "
        "without ground truth"
    )  # fmt: skip
    max_accuracy_drop: float = Field(
        0.02, ge=0.0, le=1.0, description="how far the candidate's accuracy on replayed "
        "requests with ground truth may trail production's"
    )  # fmt: skip
    min_replay_requests: int = Field(
        20, ge=1, description="replayed requests a replay check needs: with ground truth for "
        "accuracy, without for agreement"
    )  # fmt: skip
    load_requests: int = Field(400, ge=0, description="requests in the load phase")
    concurrency: int = Field(8, ge=1, le=256, description="clients in the load phase")
    max_error_rate: float = Field(0.0, ge=0.0, le=1.0)
    max_p95_ms: float = Field(500.0, gt=0.0, description="p95 latency budget in the load phase")
    max_memory_mb: float = Field(2048.0, gt=0.0, description="server memory (RSS) budget")
    timeout_s: float = Field(120.0, gt=0.0, description="how long the replica may take to start")


class CaptureConfig(_Section):
    """Production capture: request images kept (content-addressed) for retraining.

    ``read_token`` (an ``${ENV}`` reference) is the one scope that may read captured images
    back; without it the environment's client tokens can. The server applies retention and
    the size cap by itself every ``purge_interval_s``.
    """

    enabled: bool = True
    sample_rate: float = Field(1.0, ge=0.0, le=1.0)
    max_image_bytes: int = Field(1024 * 1024, ge=1, description="larger images are not kept")
    retention_days: float = Field(30.0, gt=0.0, description="then deleted unless a dataset uses it")
    max_total_bytes: int = Field(10 * 1024**3, ge=1, description="oldest deleted beyond this")
    read_token: str | None = Field(
        None, description="bearer token(s) that alone may read captured images, as ${ENV}"
    )
    purge_interval_s: float = Field(
        3600.0, ge=0.0, description="how often the server purges by retention (0: never)"
    )

    @field_validator("read_token")
    @classmethod
    def _read_token_is_a_reference(cls, value: str | None) -> str | None:
        if value is not None and not (value.startswith("${") and value.endswith("}")):
            raise ValueError(
                "write the read token as an environment reference, e.g. "
                "${LOOPLINE_CAPTURE_READ_TOKEN}: a literal token would be stored with every "
                "run's config"
            )
        return value

    def read_token_value(self) -> str | None:
        """The read token(s), from the environment variable the reference names."""
        if self.read_token is None:
            return None
        name = self.read_token[2:-1]
        if name not in os.environ:
            raise ConfigError(f"the capture read token refers to ${{{name}}}, which is not set")
        return os.environ[name]


class KubernetesConfig(_Section):
    namespace: str = "default"
    image: str | None = Field(None, description="serving image (default: loopline-NAME:VERSION)")
    replicas: int = Field(2, ge=1)
    max_replicas: int = Field(6, ge=1)
    cpu: str = "1"
    memory: str = "1Gi"
    kubeconfig: str | None = Field(None, description="apply with this kubeconfig (else render)")
    kserve: bool = True


class ContainerConfig(_Section):
    engine: Literal["auto", "docker", "podman"] = "auto"
    image: str | None = None
    replicas: int = Field(1, ge=1)


class VmConfig(_Section):
    user: str = "loopline"
    prefix: str = "/opt/loopline"


class EdgeConfig(_Section):
    mqtt_url: str | None = Field("mqtt://127.0.0.1:1883", description="telemetry over MQTT")
    topic_prefix: str = "loopline"
    hub_url: str | None = Field(None, description="the hub edge agents follow (HTTP)")
    hub_port: int = Field(8090, ge=0, le=65535)
    poll_s: float = Field(5.0, gt=0.0, description="how often an agent checks its deployment")
    heartbeat_s: float = Field(10.0, gt=0.0)


class EnvironmentConfig(_Section):
    """One environment: its target, its endpoint, and how it serves and releases."""

    target: Target = "local"
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    serve: dict[str, Any] = Field(
        default_factory=dict, description="ServeSettings fields (workers, max_batch_size, ...)"
    )
    token: str | None = Field(None, description="bearer token(s) as ${ENV} reference")
    metadata_url: str | None = Field(None, description="store the replicas log to (containers)")
    reconcile_interval_s: float = Field(1.0, gt=0.0, le=3600.0)
    replica_of: str | None = Field(
        None, description="the environment this one replicates (staging: production)"
    )
    canary: CanaryPolicy = CanaryPolicy()
    shadow: ShadowPolicy = ShadowPolicy()
    replica_test: ReplicaTestPolicy = ReplicaTestPolicy()
    capture: CaptureConfig = CaptureConfig()
    kubernetes: KubernetesConfig = KubernetesConfig()
    container: ContainerConfig = ContainerConfig()
    vm: VmConfig = VmConfig()
    edge: EdgeConfig = EdgeConfig()

    @field_validator("token")
    @classmethod
    def _token_is_a_reference(cls, value: str | None) -> str | None:
        if value is not None and not (value.startswith("${") and value.endswith("}")):
            raise ValueError(
                "write the token as an environment reference, e.g. ${LOOPLINE_PROD_TOKEN}: "
                "a literal token would be stored with every run's config"
            )
        return value

    @field_validator("serve")
    @classmethod
    def _serve_settings_exist(cls, value: dict[str, Any]) -> dict[str, Any]:
        from loopline.deploy.settings import ServeSettings

        unknown = sorted(set(value) - set(ServeSettings.model_fields))
        if unknown:
            raise ValueError(
                f"unknown serve setting(s) {', '.join(unknown)}; allowed: "
                + ", ".join(sorted(ServeSettings.model_fields))
            )
        for key in ("token", "host", "port"):
            if key in value:
                raise ValueError(f"set {key} on the environment itself, not under serve")
        if "capture_read_token" in value:
            raise ValueError("set the capture read token as capture.read_token: ${ENV}")
        return value

    def token_value(self) -> str | None:
        """The token(s), read from the environment variable the reference names."""
        if self.token is None:
            return None
        name = self.token[2:-1]
        if name not in os.environ:
            raise ConfigError(f"the environment's token refers to ${{{name}}}, which is not set")
        return os.environ[name]

    def serve_overrides(self) -> dict[str, Any]:
        """The ServeSettings fields this environment sets (host, port and token included)."""
        out = dict(self.serve)
        out["host"] = self.host
        out["port"] = self.port
        token = self.token_value()
        if token:
            out["token"] = token
        return out

    @property
    def endpoint(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"


def with_defaults(given: Any) -> dict[str, Any]:
    """``given`` environments merged over the defaults (staging replicates production)."""
    if given is None:
        given = {}
    if not isinstance(given, dict):
        raise ValueError("environments must be a mapping of names to settings")
    items: dict[str, Any] = {name: dict(s) for name, s in DEFAULT_ENVIRONMENTS.items()}
    for name, settings in given.items():
        if not isinstance(name, str) or not name.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"environment name {name!r}: use letters, digits, - and _")
        if isinstance(settings, EnvironmentConfig):
            items[name] = settings
            continue
        if settings is not None and not isinstance(settings, dict):
            raise ValueError(f"environment {name!r} must be a mapping of settings")
        base = items.get(name, {})
        items[name] = {**base, **(settings or {})} if isinstance(base, dict) else settings
    staging = items.get("staging")
    if isinstance(staging, dict):
        staging.setdefault("replica_of", "production")
    return items

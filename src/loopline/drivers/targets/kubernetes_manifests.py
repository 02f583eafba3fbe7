"""The kubernetes target's manifests, as plain dicts (see ``kubernetes`` for the files).

Pure functions of a :class:`TargetContext`: no client, no cluster.
"""

from __future__ import annotations

import shlex
from typing import Any

import yaml

from loopline.drivers.targets import TargetContext
from loopline.drivers.targets.context import (
    IMAGE_PORT,
    identity,
    identity_annotations,
    identity_env,
    identity_labels,
    image_command,
    serve_env,
    slug,
    store_url,
    token_variable,
)
from loopline.errors import ConfigError

UID = 10001  # the serving image's user (its Dockerfile: useradd --uid 10001 loopline)
FILES = ("deployment.yaml", "service.yaml", "hpa.yaml", "pdb.yaml")
KSERVE_FILE = "inferenceservice.yaml"


def resource_name(ctx: TargetContext) -> str:
    return f"loopline-{slug(ctx.environment, 50)}"


def image(ctx: TargetContext) -> str:
    name, version, _, _ = identity(ctx)
    return ctx.env.kubernetes.image or f"loopline-{slug(name)}:{version}"


def canary_percent(ctx: TargetContext) -> int | None:
    value = ctx.extra.get("canary_percent")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 100:
        raise ConfigError(f"canary_percent must be an integer from 0 to 100, not {value!r}")
    return value


def manifests(ctx: TargetContext) -> dict[str, dict[str, Any]]:
    """Every manifest by file name (the InferenceService only with ``kserve: true``)."""
    k8s = ctx.env.kubernetes
    name = resource_name(ctx)
    selector = {"app.kubernetes.io/name": "loopline", "app.kubernetes.io/instance": name}
    labels = {**selector, "app.kubernetes.io/managed-by": "loopline", **identity_labels(ctx)}
    meta = {
        "name": name,
        "namespace": k8s.namespace,
        "labels": labels,
        "annotations": identity_annotations(ctx),
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta,
        "spec": {
            "replicas": k8s.replicas,
            "revisionHistoryLimit": 5,
            "selector": {"matchLabels": selector},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
            },
            "template": {
                "metadata": {"labels": labels, "annotations": identity_annotations(ctx)},
                "spec": {
                    "automountServiceAccountToken": False,
                    "securityContext": _pod_security(),
                    "terminationGracePeriodSeconds": 30,
                    "containers": [_container(ctx, "server", read_only=True)],
                    "volumes": [{"name": "tmp", "emptyDir": {}}, {"name": "home", "emptyDir": {}}],
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {
            "type": "ClusterIP",
            "selector": selector,
            "ports": [
                {"name": "http", "port": ctx.env.port, "targetPort": "http", "protocol": "TCP"}
            ],
        },
    }
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": meta,
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicas": k8s.replicas,
            "maxReplicas": max(k8s.replicas, k8s.max_replicas),
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {
                        "name": "cpu",
                        "target": {"type": "Utilization", "averageUtilization": 70},
                    },
                }
            ],
        },
    }
    pdb = {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": meta,
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector}},
    }
    out = dict(zip(FILES, (deployment, service, hpa, pdb), strict=True))
    if k8s.kserve:
        out[KSERVE_FILE] = inference_service(ctx, meta)
    return out


def inference_service(ctx: TargetContext, meta: dict[str, Any]) -> dict[str, Any]:
    """The KServe InferenceService: the serving image as a custom predictor."""
    k8s = ctx.env.kubernetes
    container = _container(ctx, "kserve-container", read_only=False)
    # Knative (KServe's default mode) allows one unnamed port, probes on that port, no
    # startup probe in older releases, and no emptyDir unless a feature flag is on: the
    # root filesystem stays writable here (the server needs /tmp).
    container["ports"] = [{"containerPort": IMAGE_PORT, "protocol": "TCP"}]
    for probe in ("livenessProbe", "readinessProbe"):
        container[probe]["httpGet"]["port"] = IMAGE_PORT
    container.pop("startupProbe")
    container.pop("volumeMounts")
    container["env"].append({"name": "PROTOCOL", "value": "v2"})
    predictor: dict[str, Any] = {
        "minReplicas": k8s.replicas,
        "maxReplicas": max(k8s.replicas, k8s.max_replicas),
        "securityContext": _pod_security(),
        "containers": [container],
    }
    percent = canary_percent(ctx)
    if percent is not None:
        predictor["canaryTrafficPercent"] = percent
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {**meta, "name": f"{meta['name']}-kserve"},
        "spec": {"predictor": predictor},
    }


def _pod_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": UID,
        "runAsGroup": UID,
        "fsGroup": UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _container(ctx: TargetContext, name: str, *, read_only: bool) -> dict[str, Any]:
    _, _, _, bundle = identity(ctx)
    k8s = ctx.env.kubernetes
    secret = resource_name(ctx)
    env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in identity_env(ctx).items()]
    env += [{"name": k, "value": v} for k, v in serve_env(ctx.env).items()]
    env.append(_from_secret("LOOPLINE_SERVE_TOKEN", secret, "token", token_variable(ctx.env)))
    env.append(_from_secret("LOOPLINE_DB_URL", secret, "db-url", store_url(ctx)))
    # The image's own command, listening on $PORT (KServe/Knative set it; default 8080).
    command = [
        "sh",
        "-c",
        f'exec "$@" --host 0.0.0.0 --port "${{PORT:-{IMAGE_PORT}}}"',
        "sh",
        *image_command(bundle),
    ]
    resources = {"cpu": k8s.cpu, "memory": k8s.memory}

    def http(path: str, period: int, failures: int) -> dict[str, Any]:
        return {
            "httpGet": {"path": path, "port": "http"},
            "periodSeconds": period,
            "timeoutSeconds": 3,
            "failureThreshold": failures,
        }

    return {
        "name": name,
        "image": image(ctx),
        "imagePullPolicy": "IfNotPresent",
        "command": command,
        "ports": [{"name": "http", "containerPort": IMAGE_PORT, "protocol": "TCP"}],
        "env": env,
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        "startupProbe": http("/v2/health/live", 2, 60),
        "livenessProbe": http("/v2/health/live", 10, 3),
        "readinessProbe": http("/v2/health/ready", 5, 3),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": read_only,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "home", "mountPath": "/home/loopline"},
        ],
    }


def _from_secret(var: str, secret: str, key: str, required: object) -> dict[str, Any]:
    ref = {"name": secret, "key": key, "optional": not required}
    return {"name": var, "valueFrom": {"secretKeyRef": ref}}


def secret_command(ctx: TargetContext) -> str:
    """``kubectl create secret`` for the token and store URL (values as env references)."""
    parts = [
        "kubectl",
        "-n",
        ctx.env.kubernetes.namespace,
        "create",
        "secret",
        "generic",
        resource_name(ctx),
    ]
    line = shlex.join(parts)
    token = token_variable(ctx.env)
    if token:
        line += f' --from-literal=token="${{{token}}}"'
    if store_url(ctx):
        line += ' --from-literal=db-url="$LOOPLINE_DB_URL"'
    return line


class _Dumper(yaml.SafeDumper):
    """Plain YAML: a value used twice (labels) is written twice, not as an alias."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def dump(doc: dict[str, Any]) -> str:
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False)

"""The kubernetes target: manifests for one environment, applied with the official client.

``render`` writes, for environment ENV serving NAME:VERSION (all named ``loopline-ENV``)::

    deployment.yaml        the serving pods: probes on /v2/health/live and /v2/health/ready,
                           resources from ``kubernetes:``, non-root, read-only root
                           filesystem (emptyDir for /tmp and the home folder), the token and
                           LOOPLINE_DB_URL from the Secret ``loopline-ENV`` (keys ``token``,
                           ``db-url``), the model's identity in env, labels and annotations
    service.yaml           a stable ClusterIP endpoint on the environment's port
    hpa.yaml               autoscaling/v2 on CPU, ``replicas``..``max_replicas``
    pdb.yaml               policy/v1, at most one pod down at a time
    inferenceservice.yaml  KServe serving.kserve.io/v1beta1 (``kserve: true``, the default):
                           a custom predictor container ``kserve-container`` running the same
                           image on one HTTP port (``$PORT``, default 8080), PROTOCOL=v2
    kustomization.yaml     all of the above, for ``kubectl apply -k``

No Secret is written: secrets never leave the machine that holds them; the kustomization
names the ``kubectl create secret`` command instead.

``TargetContext.extra["canary_percent"]`` (an integer 0..100), when given, becomes the
InferenceService's ``canaryTrafficPercent``: KServe sends that share of requests to the
revision this render creates (the candidate) and the rest to the previous ready one.

``up`` applies the manifests (server-side apply) with the kubernetes client, installed by
the ``k8s`` extra, when a kubeconfig is configured (``kubernetes.kubeconfig``,
``$KUBECONFIG`` or ``~/.kube/config``); otherwise it writes them under
``.loopline/targets/ENV/kubernetes`` and says that no cluster is reachable.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any

import yaml

from loopline.drivers.targets import Outcome, TargetContext
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
    work_dir,
    write,
)
from loopline.errors import ConfigError, MissingExtra

UID = 10001  # the serving image's user (its Dockerfile: useradd --uid 10001 loopline)
FILES = ("deployment.yaml", "service.yaml", "hpa.yaml", "pdb.yaml")
KSERVE_FILE = "inferenceservice.yaml"
FIELD_MANAGER = "loopline"


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
            "strategy": {"type": "RollingUpdate",
                         "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},  # fmt: skip
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
            "ports": [{"name": "http", "port": ctx.env.port, "targetPort": "http",
                       "protocol": "TCP"}],  # fmt: skip
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
            "metrics": [{"type": "Resource", "resource": {"name": "cpu", "target": {
                "type": "Utilization", "averageUtilization": 70}}}],  # fmt: skip
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
    command = ["sh", "-c", f'exec "$@" --host 0.0.0.0 --port "${{PORT:-{IMAGE_PORT}}}"', "sh",
               *image_command(bundle)]  # fmt: skip
    resources = {"cpu": k8s.cpu, "memory": k8s.memory}

    def http(path: str, period: int, failures: int) -> dict[str, Any]:
        return {"httpGet": {"path": path, "port": "http"}, "periodSeconds": period,
                "timeoutSeconds": 3, "failureThreshold": failures}  # fmt: skip

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
    parts = ["kubectl", "-n", ctx.env.kubernetes.namespace, "create", "secret", "generic",
             resource_name(ctx)]  # fmt: skip
    line = shlex.join(parts)
    token = token_variable(ctx.env)
    if token:
        line += f' --from-literal=token="${{{token}}}"'
    if store_url(ctx):
        line += ' --from-literal=db-url="$LOOPLINE_DB_URL"'
    return line


def find_kubeconfig(ctx: TargetContext) -> Path | None:
    """The kubeconfig to use: the environment's, ``$KUBECONFIG``'s first, ``~/.kube/config``."""
    given = ctx.env.kubernetes.kubeconfig
    if given:
        path = Path(ctx.config.resolve(os.path.expanduser(given)))
        return path if path.is_file() else None
    for raw in os.environ.get("KUBECONFIG", "").split(os.pathsep):
        if raw and Path(raw).expanduser().is_file():
            return Path(raw).expanduser()
    default = Path.home() / ".kube" / "config"
    return default if default.is_file() else None


def _dynamic_client(kubeconfig: Path) -> Any:
    try:
        from kubernetes import client, config
        from kubernetes.dynamic import DynamicClient
    except ImportError:
        raise MissingExtra(
            "applying to a cluster needs the kubernetes client: pip install 'loopline[k8s]'"
        ) from None
    cfg = client.Configuration()
    config.load_kube_config(config_file=str(kubeconfig), client_configuration=cfg)
    cfg.retries = 1
    return DynamicClient(client.ApiClient(cfg)), cfg.host


class _Dumper(yaml.SafeDumper):
    """Plain YAML: a value used twice (labels) is written twice, not as an alias."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def dump(doc: dict[str, Any]) -> str:
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False)


def _short(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 200 else text[:197] + "..."


class KubernetesTarget:
    name = "kubernetes"

    def render(self, ctx: TargetContext, out: Path) -> list[Path]:
        files = []
        docs = manifests(ctx)
        for file, doc in docs.items():
            files.append(write(out / file, dump(doc)))
        header = (
            f"# {ctx.model_name}:{ctx.model_version} for environment {ctx.environment}.\n"
            f"# Create the Secret first (values from your environment, never from this file):\n"
            f"#   {secret_command(ctx)}\n"
            f"# then: kubectl apply -k .\n"
        )
        kustomization = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": list(docs),
        }
        files.append(write(out / "kustomization.yaml",
                           header + dump(kustomization)))  # fmt: skip
        return files

    def up(self, ctx: TargetContext) -> Outcome:
        where = work_dir(ctx, self.name)
        where.mkdir(parents=True)
        self.render(ctx, where)
        cmds = [secret_command(ctx), f"kubectl apply -k {shlex.quote(str(where))}"]
        kubeconfig = find_kubeconfig(ctx)
        if kubeconfig is None:
            return Outcome(False, self._no_kubeconfig(ctx) + f"; wrote the manifests to {where}",
                           details={"manifests": str(where)}, commands=cmds)  # fmt: skip
        try:
            dyn, host = _dynamic_client(kubeconfig)
        except MissingExtra:
            raise
        except Exception as err:  # the client's errors: config, network, TLS, auth
            return Outcome(False, f"no Kubernetes cluster is reachable with {kubeconfig}: "
                           f"{_short(err)}", commands=cmds)  # fmt: skip
        applied = []
        for file, doc in manifests(ctx).items():
            try:
                resource = dyn.resources.get(api_version=doc["apiVersion"], kind=doc["kind"])
                dyn.server_side_apply(resource, body=doc, namespace=doc["metadata"]["namespace"],
                                      field_manager=FIELD_MANAGER, force_conflicts=True)  # fmt: skip
            except Exception as err:
                hint = (" (the cluster has no KServe; set kubernetes.kserve: false)"
                        if file == KSERVE_FILE else "")  # fmt: skip
                return Outcome(False, f"applying {file} to {host} failed: {_short(err)}{hint}",
                               details={"applied": applied}, commands=cmds)  # fmt: skip
            applied.append(f"{doc['kind']}/{doc['metadata']['name']}")
        return Outcome(True, f"applied {', '.join(applied)} to {host}",
                       details={"applied": applied, "manifests": str(where)})  # fmt: skip

    def down(self, ctx: TargetContext) -> Outcome:
        name, ns = resource_name(ctx), ctx.env.kubernetes.namespace
        kinds = "deployment,service,hpa,pdb" + (",inferenceservice" if ctx.env.kubernetes.kserve
                                                else "")  # fmt: skip
        cmds = [f"kubectl -n {shlex.quote(ns)} delete {kinds} -l "
                f"app.kubernetes.io/instance={name} --ignore-not-found"]  # fmt: skip
        kubeconfig = find_kubeconfig(ctx)
        if kubeconfig is None:
            return Outcome(False, self._no_kubeconfig(ctx) + "; nothing was deleted",
                           commands=cmds)  # fmt: skip
        try:
            dyn, host = _dynamic_client(kubeconfig)
            deleted = []
            for doc in self._identities(ctx):
                resource = dyn.resources.get(api_version=doc[0], kind=doc[1])
                try:
                    dyn.delete(resource, name=doc[2], namespace=ns)
                    deleted.append(f"{doc[1]}/{doc[2]}")
                except Exception as err:
                    if getattr(err, "status", None) != 404:
                        raise
        except MissingExtra:
            raise
        except Exception as err:
            return Outcome(False, f"deleting from the cluster failed: {_short(err)}",
                           commands=cmds)  # fmt: skip
        return Outcome(True, f"deleted {', '.join(deleted) or 'nothing'} from {host}",
                       details={"deleted": deleted})  # fmt: skip

    def status(self, ctx: TargetContext) -> dict[str, Any]:
        base = {"target": self.name, "namespace": ctx.env.kubernetes.namespace,
                "name": resource_name(ctx)}  # fmt: skip
        kubeconfig = find_kubeconfig(ctx)
        if kubeconfig is None:
            return {**base, "reachable": False, "message": self._no_kubeconfig(ctx)}
        try:
            dyn, _ = _dynamic_client(kubeconfig)
            resource = dyn.resources.get(api_version="apps/v1", kind="Deployment")
            dep = dyn.get(resource, name=base["name"], namespace=base["namespace"])
        except MissingExtra:
            raise
        except Exception as err:
            return {**base, "reachable": False, "message": _short(err)}
        st = dep.status
        return {**base, "reachable": True, "replicas": st.replicas or 0,
                "ready": st.readyReplicas or 0,
                "labels": dict(dep.metadata.labels or {})}  # fmt: skip

    def _identities(self, ctx: TargetContext) -> list[tuple[str, str, str]]:
        name = resource_name(ctx)
        out = [("apps/v1", "Deployment", name), ("v1", "Service", name),
               ("autoscaling/v2", "HorizontalPodAutoscaler", name),
               ("policy/v1", "PodDisruptionBudget", name)]  # fmt: skip
        if ctx.env.kubernetes.kserve:
            out.append(("serving.kserve.io/v1beta1", "InferenceService", f"{name}-kserve"))
        return out

    def _no_kubeconfig(self, ctx: TargetContext) -> str:
        given = ctx.env.kubernetes.kubeconfig
        where = (f"kubernetes.kubeconfig {given} does not exist" if given else
                 "none configured: set environments."
                 f"{ctx.environment}.kubernetes.kubeconfig or $KUBECONFIG")  # fmt: skip
        return f"no Kubernetes cluster is reachable: no kubeconfig ({where})"

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

from loopline.drivers.targets import Outcome, TargetContext
from loopline.drivers.targets.context import work_dir, write
from loopline.drivers.targets.kubernetes_manifests import (
    KSERVE_FILE,
    dump,
    manifests,
    resource_name,
    secret_command,
)
from loopline.errors import MissingExtra

FIELD_MANAGER = "loopline"


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
        files.append(write(out / "kustomization.yaml", header + dump(kustomization)))
        return files

    def up(self, ctx: TargetContext) -> Outcome:
        where = work_dir(ctx, self.name)
        where.mkdir(parents=True)
        self.render(ctx, where)
        cmds = [secret_command(ctx), f"kubectl apply -k {shlex.quote(str(where))}"]
        kubeconfig = find_kubeconfig(ctx)
        if kubeconfig is None:
            return Outcome(
                False,
                self._no_kubeconfig(ctx) + f"; wrote the manifests to {where}",
                details={"manifests": str(where)},
                commands=cmds,
            )
        try:
            dyn, host = _dynamic_client(kubeconfig)
        except MissingExtra:
            raise
        except Exception as err:  # the client's errors: config, network, TLS, auth
            return Outcome(
                False,
                f"no Kubernetes cluster is reachable with {kubeconfig}: {_short(err)}",
                commands=cmds,
            )
        applied: list[str] = []
        for file, doc in manifests(ctx).items():
            try:
                resource = dyn.resources.get(api_version=doc["apiVersion"], kind=doc["kind"])
                ns = doc["metadata"]["namespace"]
                dyn.server_side_apply(
                    resource,
                    body=doc,
                    namespace=ns,
                    field_manager=FIELD_MANAGER,
                    force_conflicts=True,
                )
            except Exception as err:
                hint = (
                    " (the cluster has no KServe; set kubernetes.kserve: false)"
                    if file == KSERVE_FILE
                    else ""
                )
                return Outcome(
                    False,
                    f"applying {file} to {host} failed: {_short(err)}{hint}",
                    details={"applied": applied},
                    commands=cmds,
                )
            applied.append(f"{doc['kind']}/{doc['metadata']['name']}")
        return Outcome(
            True,
            f"applied {', '.join(applied)} to {host}",
            details={"applied": applied, "manifests": str(where)},
        )

    def down(self, ctx: TargetContext) -> Outcome:
        name, ns = resource_name(ctx), ctx.env.kubernetes.namespace
        kinds = "deployment,service,hpa,pdb" + (
            ",inferenceservice" if ctx.env.kubernetes.kserve else ""
        )
        cmds = [
            f"kubectl -n {shlex.quote(ns)} delete {kinds} -l "
            f"app.kubernetes.io/instance={name} --ignore-not-found"
        ]
        kubeconfig = find_kubeconfig(ctx)
        if kubeconfig is None:
            return Outcome(False, self._no_kubeconfig(ctx) + "; nothing was deleted", commands=cmds)
        try:
            dyn, host = _dynamic_client(kubeconfig)
            deleted: list[str] = []
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
            return Outcome(False, f"deleting from the cluster failed: {_short(err)}", commands=cmds)
        return Outcome(
            True,
            f"deleted {', '.join(deleted) or 'nothing'} from {host}",
            details={"deleted": deleted},
        )

    def status(self, ctx: TargetContext) -> dict[str, Any]:
        base = {
            "target": self.name,
            "namespace": ctx.env.kubernetes.namespace,
            "name": resource_name(ctx),
        }
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
        return {
            **base,
            "reachable": True,
            "replicas": st.replicas or 0,
            "ready": st.readyReplicas or 0,
            "labels": dict(dep.metadata.labels or {}),
        }

    def _identities(self, ctx: TargetContext) -> list[tuple[str, str, str]]:
        name = resource_name(ctx)
        out = [
            ("apps/v1", "Deployment", name),
            ("v1", "Service", name),
            ("autoscaling/v2", "HorizontalPodAutoscaler", name),
            ("policy/v1", "PodDisruptionBudget", name),
        ]
        if ctx.env.kubernetes.kserve:
            out.append(("serving.kserve.io/v1beta1", "InferenceService", f"{name}-kserve"))
        return out

    def _no_kubeconfig(self, ctx: TargetContext) -> str:
        given = ctx.env.kubernetes.kubeconfig
        where = (
            f"kubernetes.kubeconfig {given} does not exist"
            if given
            else "none configured: set environments."
            f"{ctx.environment}.kubernetes.kubeconfig or $KUBECONFIG"
        )
        return f"no Kubernetes cluster is reachable: no kubeconfig ({where})"

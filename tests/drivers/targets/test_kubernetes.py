"""The kubernetes target: manifests valid against the official schemas, applied only with a
kubeconfig, and a pod command that serves the model under its registry identity."""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from loopline.drivers.targets import get_target, render
from loopline.drivers.targets.context import export_bundle, open_context
from loopline.errors import ConfigError, MissingExtra
from tests.deploy.conftest import free_port, image_bytes, wait_ready
from tests.drivers.targets.conftest import TOKEN_VAR, Registered, schema_errors

SECRET = "k8s-test-token-value"


def _render(registered: Registered, out: Path, **extra: Any) -> dict[str, dict[str, Any]]:
    render(registered.load(), "production", "trucks:3", "kubernetes", out, extra or None)
    return {p.name: yaml.safe_load(p.read_text()) for p in sorted(out.glob("*.yaml"))}


@pytest.fixture
def configured(registered: Registered, monkeypatch: pytest.MonkeyPatch) -> Registered:
    monkeypatch.setenv(TOKEN_VAR, SECRET)
    registered.write_config(
        {
            "production": {
                "port": 8080,
                "token": "${" + TOKEN_VAR + "}",
                "serve": {"workers": 1, "max_batch_size": 4},
                "kubernetes": {"namespace": "vision", "replicas": 3, "max_replicas": 9,
                               "cpu": "500m", "memory": "768Mi"},
            }
        }
    )  # fmt: skip
    return registered


def test_every_manifest_validates_against_the_official_schemas(
    configured: Registered, tmp_path: Path, validators: dict[Any, Any]
) -> None:
    docs = _render(configured, tmp_path / "out", canary_percent=10)
    kustomization = docs.pop("kustomization.yaml")
    assert sorted(kustomization["resources"]) == sorted(docs)
    assert {(d["apiVersion"], d["kind"]) for d in docs.values()} == set(validators)
    for name, doc in docs.items():
        assert schema_errors(validators, doc) == [], name
    assert docs["inferenceservice.yaml"]["spec"]["predictor"]["canaryTrafficPercent"] == 10

    # And with everything optional left out: no token, no KServe, defaults.
    configured.write_config({"production": {"kubernetes": {"kserve": False}}})
    plain = _render(configured, tmp_path / "plain")
    assert "inferenceservice.yaml" not in plain
    assert "inferenceservice.yaml" not in plain.pop("kustomization.yaml")["resources"]
    for name, doc in plain.items():
        assert schema_errors(validators, doc) == [], name


def test_the_validation_catches_a_misspelled_field_or_a_wrong_type(
    configured: Registered, tmp_path: Path, validators: dict[Any, Any]
) -> None:
    docs = _render(configured, tmp_path / "out", canary_percent=25)
    deployment = copy.deepcopy(docs["deployment.yaml"])
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    assert any("readinessprobe" in e for e in schema_errors(validators, deployment))
    service = copy.deepcopy(docs["service.yaml"])
    service["spec"]["ports"][0]["port"] = "eighty"
    assert schema_errors(validators, service)
    isvc = copy.deepcopy(docs["inferenceservice.yaml"])
    isvc["spec"]["predictor"]["canaryTraficPercent"] = isvc["spec"]["predictor"].pop(
        "canaryTrafficPercent"
    )
    assert any("canaryTraficPercent" in e for e in schema_errors(validators, isvc))
    isvc = copy.deepcopy(docs["inferenceservice.yaml"])
    del isvc["spec"]["predictor"]["containers"][0]["name"]
    assert any("'name' is a required property" in e for e in schema_errors(validators, isvc))


def test_manifests_carry_the_identity_resources_and_security(
    configured: Registered, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    docs = _render(configured, out)
    dep = docs["deployment.yaml"]
    for doc in (d for n, d in docs.items() if n != "kustomization.yaml"):
        labels = doc["metadata"]["labels"]
        assert labels["loopline.dev/model"] == "trucks"
        assert labels["loopline.dev/model-version"] == "3"
        assert labels["loopline.dev/environment"] == "production"
        assert doc["metadata"]["namespace"] == "vision"
        sha = doc["metadata"]["annotations"]["loopline.dev/bundle-sha256"]
        assert sha == configured.bundle_sha256
    assert dep["spec"]["replicas"] == 3
    assert docs["hpa.yaml"]["spec"]["minReplicas"] == 3
    assert docs["hpa.yaml"]["spec"]["maxReplicas"] == 9
    pod = dep["spec"]["template"]["spec"]
    isvc_pod = docs["inferenceservice.yaml"]["spec"]["predictor"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    (server,) = pod["containers"]
    (kserve,) = isvc_pod["containers"]
    assert kserve["name"] == "kserve-container" and len(kserve["ports"]) == 1
    assert "canaryTrafficPercent" not in isvc_pod  # no canary share given
    assert server["securityContext"]["readOnlyRootFilesystem"] is True
    assert server["securityContext"]["allowPrivilegeEscalation"] is False
    assert server["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert server["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert server["resources"]["requests"] == {"cpu": "500m", "memory": "768Mi"}
    for container in (server, kserve):
        env = {e["name"]: e for e in container["env"]}
        assert env["LOOPLINE_MODEL_NAME"]["value"] == "trucks"
        assert env["LOOPLINE_MODEL_VERSION"]["value"] == "3"
        assert env["LOOPLINE_SERVE_MAX_BATCH_SIZE"]["value"] == "4"
        token = env["LOOPLINE_SERVE_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert token == {"name": "loopline-production", "key": "token", "optional": False}
        db = env["LOOPLINE_DB_URL"]["valueFrom"]["secretKeyRef"]
        assert db["key"] == "db-url" and db["optional"] is True  # SQLite project: optional
    assert {e["name"]: e["value"] for e in kserve["env"] if "value" in e}["PROTOCOL"] == "v2"
    for path in out.iterdir():
        assert SECRET not in path.read_text(), path.name
    assert (
        "kubectl -n vision create secret generic loopline-production"
        in (out / "kustomization.yaml").read_text()
    )


def test_a_bad_canary_share_is_refused(configured: Registered, tmp_path: Path) -> None:
    for bad in (101, -1, "10", True):
        with pytest.raises(ConfigError, match="canary_percent must be an integer"):
            _render(configured, tmp_path / f"out-{bad}", canary_percent=bad)
        assert not (tmp_path / f"out-{bad}").exists()


def test_the_pod_command_serves_the_model_as_trucks_3_on_port(
    configured: Registered, tmp_path: Path, image_python: str
) -> None:
    """The container's command and env, run here: /bundle is an exported bundle, `python`
    is an interpreter that sees the serving dependencies but not the installed Loopline."""
    docs = _render(configured, tmp_path / "out")
    (container,) = docs["deployment.yaml"]["spec"]["template"]["spec"]["containers"]
    bundle = tmp_path / "bundle"
    export_bundle(configured.load(), "trucks:3", bundle)
    command = [a.replace("/bundle", str(bundle)) for a in container["command"]]
    assert command[:2] == ["sh", "-c"] and command[4] == "python"
    command[4] = image_python
    assert command[2] == 'exec "$@" --host 0.0.0.0 --port "${PORT:-8080}"'
    command[2] = command[2].replace("0.0.0.0", "127.0.0.1")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOOPLINE_", "PYTHON"))}
    env.update({e["name"]: e["value"] for e in container["env"] if "value" in e})
    env.update(PORT=str(port), LOOPLINE_SERVE_TOKEN=SECRET, LOOPLINE_SERVE_WORKERS="1")
    proc = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, timeout=120, alive=lambda: proc.poll() is None)
        r = httpx.post(f"{url}/v1/models/trucks/predict", content=image_bytes(3),
                       headers={"Content-Type": "image/png"})  # fmt: skip
        assert r.status_code == 200, r.text
        assert (r.json()["model"], r.json()["model_version"]) == ("trucks", 3)
        meta = httpx.get(f"{url}/v2/models/trucks").json()
        assert (meta["name"], meta["versions"]) == ("trucks", ["3"]), meta
    finally:
        proc.terminate()
        proc.wait(60)


# -- up / down / status -------------------------------------------------------------------------
@pytest.fixture
def no_kubeconfig(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.kube/config


def test_up_without_a_kubeconfig_says_no_cluster_is_reachable(
    configured: Registered, no_kubeconfig: None
) -> None:
    target = get_target("kubernetes")
    with open_context(configured.load(), "production", "trucks:3") as ctx:
        outcome = target.up(ctx)
        status = target.status(ctx)
        down = target.down(ctx)
    assert outcome.ok is False
    assert outcome.message.startswith("no Kubernetes cluster is reachable: no kubeconfig")
    where = configured.root / ".loopline" / "targets" / "production" / "kubernetes"
    assert outcome.commands[-1] == f"kubectl apply -k {where}"
    assert (where / "deployment.yaml").is_file() and (where / "kustomization.yaml").is_file()
    assert SECRET not in " ".join([outcome.message, *outcome.commands])
    assert status["reachable"] is False and "no kubeconfig" in status["message"]
    assert down.ok is False and "kubectl -n vision delete" in down.commands[0]


def test_up_with_a_kubeconfig_and_no_cluster_says_so(
    configured: Registered, no_kubeconfig: None, tmp_path: Path
) -> None:
    """A real kubernetes client against a loopback port where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "here",
        "clusters": [{"name": "here", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
        "users": [{"name": "me", "user": {"token": "not-a-real-token"}}],
        "contexts": [{"name": "here", "context": {"cluster": "here", "user": "me"}}],
    }))  # fmt: skip
    configured.write_config({"production": {"kubernetes": {"kubeconfig": str(kubeconfig)}}})
    target = get_target("kubernetes")
    with open_context(configured.load(), "production", "trucks:3") as ctx:
        outcome = target.up(ctx)
        status = target.status(ctx)
    assert outcome.ok is False, outcome
    assert outcome.message.startswith(f"no Kubernetes cluster is reachable with {kubeconfig}")
    assert "\n" not in outcome.message and "not-a-real-token" not in outcome.message
    assert status["reachable"] is False


def test_a_missing_client_names_the_extra(
    configured: Registered, no_kubeconfig: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("apiVersion: v1\nkind: Config\n")
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.setitem(sys.modules, "kubernetes", None)  # as if not installed
    with (
        open_context(configured.load(), "production", "trucks:3") as ctx,
        pytest.raises(MissingExtra, match=r"loopline\[k8s\]"),
    ):
        get_target("kubernetes").up(ctx)

"""Fixtures for the target tests: a project whose registry holds trucks:1..3, real bundles.

The registry name (``trucks``) differs from the name inside the bundle's metadata
(``vehicles``) on purpose: a server started from a rendered output can only report
``trucks:3`` if the identity the target gives it reaches the server.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import (  # noqa: F401 - fixtures shared with the serving tests
    bundle_files,
    image_python,
    model_bytes,
)

SCHEMAS = Path(__file__).parent / "schemas"
TOKEN_VAR = "LOOPLINE_TARGETS_TEST_TOKEN"


@dataclass
class Registered:
    """A project whose registry holds ``trucks:1`` to ``trucks:3`` (one bundle)."""

    root: Path
    config: Path
    bundle_sha256: str

    def write_config(self, environments: dict[str, Any] | None = None) -> None:
        data: dict[str, Any] = {"project": "fleet", "model": {"name": "trucks"}}
        if environments:
            data["environments"] = environments
        self.config.write_text(yaml.safe_dump(data))

    def load(self) -> Any:
        from loopline.config import load_config

        return load_config(self.config)


def register_project(root: Path, model: bytes, versions: int = 3) -> Registered:
    from loopline.bundle import write_bundle
    from loopline.config import load_config
    from loopline.drivers.artifacts.store import ArtifactStore
    from loopline.drivers.metadata.store import MetadataStore

    root.mkdir(parents=True, exist_ok=True)
    project = Registered(root, root / "loopline.yaml", "")
    project.write_config()
    cfg = load_config(project.config)
    store = MetadataStore(cfg.metadata_url())
    for number in range(1, versions + 1):
        files = bundle_files(model, name="vehicles")  # a distinct bundle per version
        files["metadata.json"] = json.dumps({"name": "vehicles", "build": number}).encode()
        tar = root / f"bundle-{number}.tar"
        write_bundle(files, tar)
        ref = ArtifactStore(cfg.artifacts_url()).put_file(tar)
        store.models.register(
            "trucks",
            metrics={"accuracy": 0.5},
            bundle_uri=ref.uri,
            bundle_sha256=ref.sha256,
            dataset_version=None,
            run_id=None,
            lineage={},
        )
    store.close()
    project.bundle_sha256 = ref.sha256
    return project


@pytest.fixture
def registered(tmp_path: Path, model_bytes: bytes) -> Registered:  # noqa: F811
    return register_project(tmp_path / "project", model_bytes)


def load_json_schema(name: str) -> dict[str, Any]:
    import gzip

    with gzip.open(SCHEMAS / f"{name}.json.gz", "rt") as f:
        data: dict[str, Any] = json.load(f)
    return data


K8S_SCHEMAS = {
    ("apps/v1", "Deployment"): "deployment-apps-v1",
    ("v1", "Service"): "service-v1",
    ("autoscaling/v2", "HorizontalPodAutoscaler"): "horizontalpodautoscaler-autoscaling-v2",
    ("policy/v1", "PodDisruptionBudget"): "poddisruptionbudget-policy-v1",
}


def _strict(node: Any) -> Any:
    """A CRD schema made strict as kubeconform's openapi2jsonschema.py does (see README)."""
    if isinstance(node, list):
        return [_strict(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _strict(value) for key, value in node.items()}
    if out.pop("x-kubernetes-int-or-string", False):
        out["oneOf"] = [{"type": "string"}, {"type": "integer"}]
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="session")
def validators() -> dict[tuple[str, str], Any]:
    return build_validators()


def build_validators() -> dict[tuple[str, str], Any]:
    """A jsonschema validator per (apiVersion, kind) from the vendored official schemas."""
    import gzip

    from jsonschema import Draft7Validator

    # The schemas name no usable $schema ("http://json-schema.org/schema#"); their
    # keywords are draft-4 era, which Draft 7 reads the same way.
    out: dict[tuple[str, str], Any] = {}
    for key, name in K8S_SCHEMAS.items():
        schema = load_json_schema(name)
        out[key] = Draft7Validator(schema)
    with gzip.open(SCHEMAS / "serving.kserve.io_inferenceservices.yaml.gz", "rt") as f:
        crd = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 2 MB
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1beta1"]
    schema = _strict(version["schema"]["openAPIV3Schema"])
    # The CRD leaves apiVersion and kind to the API server; pin them as it would.
    schema["properties"]["apiVersion"] = {"enum": ["serving.kserve.io/v1beta1"]}
    schema["properties"]["kind"] = {"enum": ["InferenceService"]}
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    out[("serving.kserve.io/v1beta1", "InferenceService")] = Draft7Validator(schema)
    return out


def schema_errors(validators: dict[tuple[str, str], Any], doc: dict[str, Any]) -> list[str]:
    """Every schema error of ``doc``, as 'path: message' (empty when it validates)."""
    validator = validators[(doc["apiVersion"], doc["kind"])]
    return [
        f"{'.'.join(str(p) for p in err.absolute_path)}: {err.message}"
        for err in validator.iter_errors(doc)
    ]

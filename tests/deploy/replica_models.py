"""Real, tiny ONNX classifiers for the replica tests, made without training a network.

- ``ridge``: a linear classifier on the raw pixels, fit in closed form (ridge regression on
  one-hot targets, numpy) to the train split of the tiny lake: a real model that learnt from
  the data, scoring about 0.5 accuracy on its test split where chance is about 0.2;
- ``constant``: answers one class whatever the image (a broken model).

Both are a Flatten and a Gemm in ONNX, packed as Loopline bundles and registered with the
lineage of the lake's dataset version, so the replica test finds their test split.
A project over the tiny lake with fast serving settings comes with them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tests.conftest import TINY_CONFIG
from tests.deploy.conftest import LABELS, bundle_files, free_port

SIZE = 32
RULE = "accuracy >= 0.4"  # ridge passes it, a constant class cannot on five balanced classes


def linear_onnx(weights: np.ndarray, bias: np.ndarray, size: int = SIZE) -> bytes:
    """ONNX model: input float32 [N, 3, size, size] -> logits = flatten(x) @ W + b."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["input"], ["flat"], axis=1),
            helper.make_node("Gemm", ["flat", "W", "b"], ["logits"]),
        ],
        "linear",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", weights.shape[1]])],
        initializer=[
            numpy_helper.from_array(weights.astype(np.float32), "W"),
            numpy_helper.from_array(bias.astype(np.float32), "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def constant_onnx(label: str, size: int = SIZE) -> bytes:
    """A model that answers ``label`` for every image."""
    bias = np.zeros(len(LABELS))
    bias[LABELS.index(label)] = 10.0
    return linear_onnx(np.zeros((3 * size * size, len(LABELS))), bias, size)


def ridge_onnx(x: np.ndarray, y: np.ndarray, lam: float = 1e3) -> bytes:
    """A ridge classifier fit on ``x`` (uint8 [N, H, W, 3]) and class indices ``y``."""
    from loopline.bundle import to_input

    feats = to_input(x).reshape(len(x), -1).astype(np.float64)
    feats = np.c_[feats, np.ones(len(feats))]  # the bias as one more feature
    targets = np.eye(len(LABELS))[y]
    alpha = np.linalg.solve(feats @ feats.T + lam * np.eye(len(feats)), targets)  # dual form
    w = feats.T @ alpha
    return linear_onnx(w[:-1], w[-1])


def onnx_labels(model: bytes, x: np.ndarray) -> list[str]:
    """What ``model`` answers for ``x`` (uint8 [N, H, W, 3]), with ONNX Runtime in process."""
    import onnxruntime as ort

    from loopline.bundle import to_input

    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"input": to_input(x)})
    return [LABELS[i] for i in logits.argmax(axis=1)]


# No latency budget that a loaded test machine could miss: tests never assert on timing.
POLICY = (
    '{{rules: ["{rule}"], load_requests: 40, concurrency: 4, replay: 50, timeout_s: 120, '
    "max_p95_ms: 600000, max_memory_mb: 4096}}"
)
REPLICA_CONFIG = """\
environments:
  production:
    port: {prod_port}
    serve: {{workers: 1, flush_interval_s: 0.2, max_images_per_request: 16}}
  staging: {{port: {staging_port}, replica_test: {policy}}}
  preprod: {{port: {preprod_port}, replica_of: production, replica_test: {policy}}}
"""


@dataclass
class ReplicaProject:
    """A project over the tiny lake: its config, stores, and the lake's splits as a build
    computes them (the builder's own ingest, validate and split steps)."""

    root: Path
    config_path: Path
    dataset_version: str
    splits: pd.DataFrame

    @property
    def config(self) -> Any:
        from loopline.config import load_config

        return load_config(self.config_path)

    def store(self) -> Any:
        from loopline.drivers.metadata.store import MetadataStore

        return MetadataStore(self.config.metadata_url())

    def artifacts(self) -> Any:
        from loopline.drivers.artifacts import ArtifactStore

        return ArtifactStore(self.config.artifacts_url())

    def images(self, split: str) -> tuple[pd.DataFrame, np.ndarray]:
        """The records of ``split`` and their pixels, decoded as the build decodes them."""
        from loopline.builder.images import load_images
        from loopline.builder.resources import BuildResources
        from loopline.pipeline import StepContext
        from loopline.pipeline.step import SilentReporter

        rows = self.splits[self.splits["split"] == split].reset_index(drop=True)
        res = BuildResources(self.config, self.store(), self.artifacts()).for_steps()
        ctx = StepContext("t", "t", SilentReporter(), res)
        return rows, load_images(ctx, rows, SIZE)

    def register(self, model: bytes, *, dataset: bool = True) -> int:
        """Register ``model`` as the next version of ``tiny``; returns its version."""
        from loopline.bundle import write_bundle

        tar = self.root / f"bundle-{abs(hash(model))}.tar"
        write_bundle(bundle_files(model, SIZE, name="tiny"), tar)
        ref = self.artifacts().put_file(tar)
        store = self.store()
        reg = store.models.register(
            "tiny",
            bundle_uri=ref.uri,
            bundle_sha256=ref.sha256,
            metrics={},
            dataset_version=self.dataset_version if dataset else None,
            lineage={"dataset_version": self.dataset_version} if dataset else {"imported": True},
        )
        store.close()
        return int(reg.version.version)


def make_replica_project(
    root: Path, lake: Path, db_url: str | None = None, *, extra: str = ""
) -> ReplicaProject:
    """Write the project's config (``extra`` YAML appended) and split the lake."""
    from loopline.builder.ingest import ingest
    from loopline.builder.pipeline import build_pipeline
    from loopline.builder.resources import BuildResources
    from loopline.builder.split import split
    from loopline.builder.validate import validate
    from loopline.config import load_config
    from loopline.pipeline import StepContext
    from loopline.pipeline.step import SilentReporter

    root.mkdir(parents=True, exist_ok=True)
    config = root / "loopline.yaml"
    text = TINY_CONFIG.format(
        db=db_url or f"sqlite:///{root / 'state' / 'loopline.db'}",
        artifacts=root / "state" / "artifacts",
        lake=lake,
    )
    text += REPLICA_CONFIG.format(
        prod_port=free_port(),
        staging_port=free_port(),
        preprod_port=free_port(),
        policy=POLICY.format(rule=RULE),
    )
    config.write_text(text + extra)
    cfg = load_config(config)
    from loopline.drivers.artifacts import ArtifactStore
    from loopline.drivers.metadata.store import MetadataStore

    store = MetadataStore(cfg.metadata_url())
    res = BuildResources(cfg, store, ArtifactStore(cfg.artifacts_url())).for_steps()
    ctx = StepContext("t", "t", SilentReporter(), res)
    steps, raw = build_pipeline(), cfg.to_dict()
    ingested = ingest(ctx, steps.step("ingest").select_params(raw))
    clean = validate(ctx, ingested["records"], steps.step("validate").select_params(raw))["clean"]
    splits = split(ctx, clean, steps.step("split").select_params(raw))
    store.close()
    return ReplicaProject(root, config, ingested["dataset"]["version"], splits)

"""``import_onnx``: an ONNX file from elsewhere becomes a verified, registered, servable bundle.

The models are written with ``onnx.helper`` here (no training): mean colour per channel,
then a linear layer, so their answers are easy to check by hand.
"""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loopline.deploy.importing import import_onnx, parse_input_size, parse_labels
from loopline.errors import ConfigError, InvalidInput, LooplineError
from tests.deploy.conftest import image_bytes

LABELS = ["cat", "dog", "bird"]
WEIGHTS = np.array([[1.0, -1.0, 0.5], [0.0, 2.0, -1.0], [-1.0, 0.5, 1.0]], np.float32) / 255


def make_onnx(
    path: Path,
    classes: int = 3,
    size: tuple[Any, Any] = (24, 20),
    batch: Any = "N",
    inputs: int = 1,
    out_dim: Any = None,
) -> Path:
    """[batch, 3, H, W] float32 -> GlobalAveragePool -> Flatten -> Gemm -> [batch, classes]."""
    from onnx import TensorProto, helper, numpy_helper, save

    w = np.resize(WEIGHTS, (3, classes)).astype(np.float32)
    nodes = [
        helper.make_node("GlobalAveragePool", ["pixels"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "w"], ["scores"]),
    ]
    ins = [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [batch, 3, *size])]
    ins += [
        helper.make_tensor_value_info(f"extra{i}", TensorProto.FLOAT, [batch, 1])
        for i in range(inputs - 1)
    ]
    outs = [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [batch, out_dim or classes])]
    graph = helper.make_graph(
        nodes, "tiny", ins, outs, initializer=[numpy_helper.from_array(w, "w")]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    save(model, str(path))
    return path


def open_registry(tmp_path: Path, url: str) -> Any:
    from loopline.drivers.artifacts.store import ArtifactStore
    from loopline.drivers.metadata.store import MetadataStore

    return MetadataStore(url), ArtifactStore(str(tmp_path / "artifacts"))


@pytest.fixture
def registry(tmp_path: Path, db_url: str) -> Any:
    """A store on each backend (SQLite, PostgreSQL) and an artifact store."""
    store, artifacts = open_registry(tmp_path, db_url)
    yield store, artifacts
    store.close()


@pytest.fixture
def sqlite_registry(tmp_path: Path) -> Any:
    """For refusals that reach no store: SQLite only."""
    store, artifacts = open_registry(tmp_path, f"sqlite:///{tmp_path / 'm.db'}")
    yield store, artifacts
    store.close()


def test_import_registers_a_verified_bundle_once(registry: Any, tmp_path: Path) -> None:
    from loopline.bundle import fetch_bundle
    from loopline.deploy.image import image_context_files

    store, artifacts = registry
    onnx_path = make_onnx(tmp_path / "classifier.onnx")
    result = import_onnx(store, artifacts, onnx_path, "pets", LABELS, actor="ana")
    assert (result.name, result.version, result.created) == ("pets", 1, True)
    assert result.input_size == (24, 20)
    mv = store.models.resolve("pets@candidate")  # the alias a build gives
    assert mv.version == 1 and mv.metrics == {} and mv.bundle_sha256 == result.bundle_sha256
    onnx_sha = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    assert mv.lineage["imported"] is True and mv.lineage["source_file"] == "classifier.onnx"
    assert mv.lineage["sha256"] == onnx_sha == result.onnx_sha256
    event = store.audit.recent(5)[0]
    assert (event.action, event.subject, event.actor) == ("model.import", "pets:1", "ana")
    assert event.details["sha256"] == onnx_sha
    # The bundle: the package step's files, verified against the registered sha256.
    bundle = fetch_bundle(artifacts, mv.bundle_sha256, tmp_path / "cache")
    names = {p.relative_to(bundle.path).as_posix() for p in bundle.path.rglob("*") if p.is_file()}
    assert names == {"model.onnx", "labels.json", "preprocess.json", "metadata.json",
                     "MANIFEST.json", *image_context_files()}  # fmt: skip
    assert bundle.labels == LABELS and bundle.model_path.read_bytes() == onnx_path.read_bytes()
    spec = bundle.preprocess
    assert (spec.height, spec.width, spec.input_name, spec.output_name) == (
        24, 20, "pixels", "scores",
    )  # fmt: skip
    assert bundle.metadata["imported"] is True and bundle.metadata["metrics"] == {}
    # The same file again, even under another file name: nothing new.
    copy = tmp_path / "renamed.onnx"
    copy.write_bytes(onnx_path.read_bytes())
    again = import_onnx(store, artifacts, copy, "pets", LABELS)
    assert (again.version, again.created) == (1, False)
    assert [v.version for v in store.models.versions("pets")] == [1]
    assert [e.action for e in store.audit.recent(10)].count("model.import") == 1
    # Other labels are another model: version 2.
    other = import_onnx(store, artifacts, onnx_path, "pets", ["a", "b", "c"])
    assert (other.version, other.created) == (2, True)


def test_imported_model_is_served_under_its_registry_identity(tmp_path: Path) -> None:
    import httpx
    from PIL import Image

    from loopline.config import load_config
    from loopline.deploy.server import ModelSource, create_app, load_model
    from loopline.deploy.settings import ServeSettings
    from loopline.drivers.artifacts.store import ArtifactStore
    from loopline.drivers.metadata.store import MetadataStore
    from tests.deploy.conftest import run_in_thread

    config = tmp_path / "loopline.yaml"
    config.write_text("project: pets\n")
    cfg = load_config(config)
    store = MetadataStore(cfg.metadata_url())
    artifacts = ArtifactStore(cfg.artifacts_url())
    import_onnx(store, artifacts, make_onnx(tmp_path / "a.onnx", classes=2), "pets", ["x", "y"])
    import_onnx(store, artifacts, make_onnx(tmp_path / "b.onnx"), "pets", LABELS)
    store.close()
    settings = ServeSettings(log_predictions=False)
    served, _ = load_model(ModelSource(ref="pets:2", config=config), settings)
    png = image_bytes(4, size=(40, 30))
    with run_in_thread(create_app(served, settings)) as url:
        r = httpx.post(
            f"{url}/v1/models/pets/predict", content=png, headers={"Content-Type": "image/png"}
        )
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["model"], body["model_version"]) == ("pets", 2)
    # The answer is the model's: mean RGB of the resized image times the weights.
    rgb = Image.open(io.BytesIO(png)).convert("RGB").resize((20, 24), Image.Resampling.BILINEAR)
    logits = np.asarray(rgb, np.float32).reshape(-1, 3).mean(axis=0) @ WEIGHTS
    assert body["predictions"][0]["label"] == LABELS[int(np.argmax(logits))]


def test_wrong_output_size_is_refused(registry: Any, tmp_path: Path) -> None:
    store, artifacts = registry
    with pytest.raises(InvalidInput, match=r"has 4 outputs per image but --labels names 3"):
        import_onnx(store, artifacts, make_onnx(tmp_path / "m.onnx", classes=4), "m", LABELS)
    # A class axis the model leaves open is checked by running it.
    dynamic = make_onnx(tmp_path / "d.onnx", classes=4, out_dim="C")
    with pytest.raises(InvalidInput, match=r"has 4 outputs per image but --labels names 3"):
        import_onnx(store, artifacts, dynamic, "m", LABELS)
    assert store.models.versions() == []
    assert artifacts.fs.ls(f"{artifacts.root}/sha256") == []


def test_input_size_from_the_model_or_the_flag(sqlite_registry: Any, tmp_path: Path) -> None:
    store, artifacts = sqlite_registry
    dynamic = make_onnx(tmp_path / "dyn.onnx", size=("H", "W"))
    with pytest.raises(ConfigError, match="does not fix its input size .* give --input-size H,W"):
        import_onnx(store, artifacts, dynamic, "m", LABELS)
    result = import_onnx(store, artifacts, dynamic, "m", LABELS, (32, 48))
    assert result.input_size == (32, 48)
    fixed = make_onnx(tmp_path / "fixed.onnx")
    with pytest.raises(ConfigError, match="disagrees with fixed.onnx, whose input is fixed"):
        import_onnx(store, artifacts, fixed, "m", LABELS, (32, 48))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"inputs": 2}, r"has 2 input\(s\) \(pixels, extra0\)"),
        ({"batch": 1}, "the batch axis is fixed"),
        ({"size": (24,)}, r"input 'pixels' is tensor\(float\) \[.N., 3, 24\]"),
    ],
)
def test_models_of_another_shape_are_refused(
    sqlite_registry: Any, tmp_path: Path, kwargs: dict[str, Any], message: str
) -> None:
    store, artifacts = sqlite_registry
    with pytest.raises(InvalidInput, match=message):
        import_onnx(store, artifacts, make_onnx(tmp_path / "m.onnx", **kwargs), "m", LABELS)


def test_files_and_names_that_are_not_models(sqlite_registry: Any, tmp_path: Path) -> None:
    store, artifacts = sqlite_registry
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(InvalidInput, match="ONNX Runtime cannot load .*junk.onnx"):
        import_onnx(store, artifacts, tmp_path / "junk.onnx", "m", LABELS)
    with pytest.raises(LooplineError, match="is not a file"):
        import_onnx(store, artifacts, tmp_path / "absent.onnx", "m", LABELS)
    with pytest.raises(ConfigError, match="--name 'm:1'"):
        import_onnx(store, artifacts, make_onnx(tmp_path / "m.onnx"), "m:1", LABELS)


def test_parsing_labels_and_sizes() -> None:
    assert parse_labels("car, van,truck") == ["car", "van", "truck"]
    assert parse_input_size("64,48") == (64, 48) and parse_input_size("32") == (32, 32)
    for bad in ("car", "car,,van", ""):
        with pytest.raises(ConfigError, match="two or more class names"):
            parse_labels(bad)
    with pytest.raises(ConfigError, match="more than once"):
        parse_labels("car,van,car")
    for bad in ("64,", "a,b", "0,5", "1,2,3"):
        with pytest.raises(ConfigError, match="give H,W"):
            parse_input_size(bad)


IMPORT_CHECK = """
import sys
from loopline.deploy.importing import import_onnx
from loopline.drivers.artifacts.store import ArtifactStore
from loopline.drivers.metadata.store import MetadataStore
store = MetadataStore(sys.argv[2])
r = import_onnx(store, ArtifactStore(sys.argv[3]), sys.argv[1], "m", ["cat", "dog", "bird"])
assert r.created, r
print(",".join(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "onnx"))))
"""


def test_import_needs_no_torch(tmp_path: Path) -> None:
    model = make_onnx(tmp_path / "m.onnx")
    out = subprocess.run(
        [sys.executable, "-c", IMPORT_CHECK, str(model), f"sqlite:///{tmp_path / 'db'}",
         str(tmp_path / "art")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"import_onnx imported {out.stdout.strip()}"

"""A model built by `loopline build` is served; the official OIP v2 client agrees with ONNX
Runtime in-process on the test split, and the prediction log and feedback close the loop."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import onnxruntime as ort
import pytest
import tritonclient.http as triton
from typer.testing import CliRunner

from loopline.builder.images import load_images
from loopline.bundle import fetch_bundle, to_input
from loopline.cli.main import app
from loopline.config import load_config
from loopline.drivers.artifacts import ArtifactStore
from loopline.drivers.metadata.store import MetadataStore
from loopline.pipeline import StepContext, codecs
from loopline.pipeline.step import SilentReporter
from tests.deploy.conftest import run_in_thread

pytestmark = pytest.mark.slow
TOKEN = "e2e-secret"


def test_built_model_served_matches_in_process(project: Path, tmp_path: Path) -> None:
    from loopline.builder.resources import BuildResources
    from loopline.deploy.server import ModelSource, create_app, load_model
    from loopline.deploy.settings import ServeSettings

    result = CliRunner().invoke(app, ["build", "-c", str(project), "--json"])
    assert result.exit_code == 0, result.stderr
    built = json.loads(result.stdout)
    cfg = load_config(project)
    store = MetadataStore(cfg.metadata_url())
    artifacts = ArtifactStore(cfg.artifacts_url())

    # The test split of that very run, decoded as the build decoded it.
    split_step = [s for s in store.steps.for_run(built["run_id"]) if s.step == "split"][0]
    ref = split_step.outputs["splits"]
    splits = codecs.decode(ref["codec"], artifacts.get_bytes(ref["sha256"]))
    test = splits[splits["split"] == "test"].reset_index(drop=True)
    bundle = fetch_bundle(artifacts, built["model"]["bundle_sha256"], tmp_path / "bundles")
    ctx = StepContext("t", "t", SilentReporter(), BuildResources(cfg, store, artifacts))
    x = load_images(ctx, test, bundle.preprocess.height)
    session = ort.InferenceSession(str(bundle.model_path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"input": to_input(x)})
    expected = [bundle.labels[i] for i in logits.argmax(axis=1)]

    settings = ServeSettings(token=TOKEN, flush_interval_s=0.2, workers=1)
    served, log_store = load_model(ModelSource(ref="tiny@candidate", config=project), settings)
    server_app = create_app(served, settings, log_store, spill_dir=tmp_path)
    with run_in_thread(server_app) as url:
        client = triton.InferenceServerClient(url.removeprefix("http://"))
        try:
            assert client.is_model_ready("tiny", "1")
            got: list[str] = []
            for start in range(0, len(x), 16):
                batch = x[start : start + 16]
                inp = triton.InferInput("input", list(to_input(batch).shape), "FP32")
                inp.set_data_from_numpy(to_input(batch), binary_data=True)
                out = triton.InferRequestedOutput("logits", binary_data=True)
                res = client.infer("tiny", [inp], outputs=[out], model_version="1")
                got += [bundle.labels[i] for i in res.as_numpy("logits").argmax(axis=1)]
        finally:
            client.close()
        assert got == expected

        # The image API: same answer for a raw PNG from the lake, logged with its metadata.
        path = test["path"].iloc[0]
        raw = (Path(cfg.resolve(cfg.data.source.uri)) / path).read_bytes()
        r = httpx.post(
            f"{url}/v1/models/tiny/predict?camera_id=cam01",
            content=raw,
            headers={"content-type": "image/png"},
        )
        assert r.status_code == 200, r.text
        answer = r.json()["predictions"][0]
        assert answer["label"] == expected[0] and answer["model_version"] == 1
        flush = httpx.post(f"{url}/v1/admin/flush", headers={"authorization": f"Bearer {TOKEN}"})
        assert flush.status_code == 200, flush.text
        rows = store.predictions.find(model_name="tiny")
        logged = [row for row in rows if row.id == answer["prediction_id"]]
        assert logged and logged[0].request_metadata["camera_id"] == "cam01"
        fb = httpx.post(
            f"{url}/v1/feedback",
            json={"prediction_id": answer["prediction_id"], "label": test["label"].iloc[0]},
            headers={"authorization": f"Bearer {TOKEN}"},
        )
        assert fb.status_code == 200, fb.text
        assert fb.json()["results"][0]["status"] == "recorded"

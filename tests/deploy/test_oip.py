"""Open Inference Protocol v2, exercised with the official Triton HTTP client as it is."""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.deploy.conftest import LABELS, SIZE, Running, image_bytes, reference_labels


@pytest.fixture(scope="module")
def client(server: Running) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(server.url.removeprefix("http://"))
    yield c
    c.close()


def pixels(images: list[bytes]) -> np.ndarray:
    from loopline.bundle import PreprocessSpec, decode_image, to_input

    spec = PreprocessSpec(height=SIZE, width=SIZE)
    return to_input(np.stack([decode_image(b, spec) for b in images]))


def test_health_and_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("vehicles")
    assert client.is_model_ready("vehicles", "1")
    assert not client.is_model_ready("nosuch")
    assert not client.is_model_ready("vehicles", "7")
    server = client.get_server_metadata()
    assert server["name"] == "loopline" and "binary_tensor_data" in server["extensions"]
    meta = client.get_model_metadata("vehicles")
    assert meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 3, SIZE, SIZE]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, len(LABELS)]}]
    assert client.get_model_config("vehicles")["name"] == "vehicles"


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_matches_onnx_runtime_in_process(
    client: triton.InferenceServerClient, model_bytes: bytes, binary: bool
) -> None:
    images = [image_bytes(i) for i in range(40, 52)]
    x = pixels(images)
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    out = triton.InferRequestedOutput("logits", binary_data=binary)
    result = client.infer("vehicles", [inp], outputs=[out], request_id="req-1")
    logits = result.as_numpy("logits")
    assert logits.shape == (12, len(LABELS))
    assert [LABELS[i] for i in logits.argmax(axis=1)] == reference_labels(model_bytes, images)
    response = result.get_response()
    assert response["id"] == "req-1"
    assert response["model_name"] == "vehicles" and response["model_version"] == "1"
    assert len(response["parameters"]["prediction_ids"].split(",")) == 12


def test_infer_uint8_default_outputs_and_version(client: triton.InferenceServerClient) -> None:
    x = pixels([image_bytes(60), image_bytes(61)])
    inp = triton.InferInput("input", list(x.shape), "UINT8")
    inp.set_data_from_numpy(x.astype(np.uint8), binary_data=False)
    # No outputs named: the client asks for every output in binary.
    r8 = client.infer("vehicles", [inp], model_version="1").as_numpy("logits")
    f = triton.InferInput("input", list(x.shape), "FP32")
    f.set_data_from_numpy(x)
    r32 = client.infer("vehicles", [f]).as_numpy("logits")
    np.testing.assert_allclose(r8, r32, rtol=1e-5, atol=1e-5)


def test_classification_extension(client: triton.InferenceServerClient) -> None:
    x = pixels([image_bytes(70), image_bytes(71)])
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    for binary in (True, False):
        out = triton.InferRequestedOutput("logits", binary_data=binary, class_count=3)
        classes = client.infer("vehicles", [inp], outputs=[out]).as_numpy("logits")
        assert classes.shape == (2, 3)
        first = classes[0, 0].decode() if binary else str(classes[0, 0])
        value, index, label = first.split(":")
        assert LABELS[int(index)] == label and float(value) == pytest.approx(float(value))


def test_client_errors_are_4xx_with_a_message(client: triton.InferenceServerClient) -> None:
    good = triton.InferInput("input", [1, 3, SIZE, SIZE], "FP32")
    good.set_data_from_numpy(np.zeros((1, 3, SIZE, SIZE), dtype=np.float32))
    with pytest.raises(InferenceServerException, match="is not served here") as err:
        client.infer("nosuch", [good])
    assert err.value.status() == "404"
    with pytest.raises(InferenceServerException, match="no version '9'") as err:
        client.infer("vehicles", [good], model_version="9")
    assert err.value.status() == "404"

    wrong_shape = triton.InferInput("input", [1, 3, SIZE + 1, SIZE], "FP32")
    wrong_shape.set_data_from_numpy(np.zeros((1, 3, SIZE + 1, SIZE), dtype=np.float32))
    with pytest.raises(InferenceServerException, match="shape") as err:
        client.infer("vehicles", [wrong_shape])
    assert err.value.status() == "400"

    wrong_dtype = triton.InferInput("input", [1, 3, SIZE, SIZE], "INT64")
    wrong_dtype.set_data_from_numpy(np.zeros((1, 3, SIZE, SIZE), dtype=np.int64))
    with pytest.raises(InferenceServerException, match="datatype") as err:
        client.infer("vehicles", [wrong_dtype])
    assert err.value.status() == "400"

    wrong_name = triton.InferInput("image", [1, 3, SIZE, SIZE], "FP32")
    wrong_name.set_data_from_numpy(np.zeros((1, 3, SIZE, SIZE), dtype=np.float32))
    with pytest.raises(InferenceServerException, match="unknown input"):
        client.infer("vehicles", [wrong_name])

    with pytest.raises(InferenceServerException, match="unknown output"):
        client.infer("vehicles", [good], outputs=[triton.InferRequestedOutput("probs")])


@pytest.mark.parametrize(
    ("body", "headers", "status", "match"),
    [
        (b"", {}, 400, "empty body"),
        (b"{not json", {}, 400, "not valid JSON"),
        (b"[1, 2]", {}, 400, "JSON object"),
        (b'{"inputs": []}', {}, 400, "non-empty list"),
        (
            b'{"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32",'
            b' "data": [1, 2, 3]}]}',
            {},
            400,
            "has 3 values",
        ),
        (
            b'{"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "UINT8",'
            b' "data": [[300]]}]}',
            {},
            400,
            "0 to 255|has 1 values",
        ),
        (
            b'{"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32",'
            b' "data": [[1, 2], [3]]}]}',
            {},
            400,
            "rectangular",
        ),
        (
            b'{"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32",'
            b' "parameters": {"binary_data_size": 12288}}]}',
            {"Inference-Header-Content-Length": "LEN"},
            400,
            "binary_data_size|fewer than",
        ),
        (b'{"inputs": []}', {"Inference-Header-Content-Length": "999"}, 400, "does not fit"),
        (b'{"inputs": []}', {"Content-Type": "text/plain"}, 415, "unsupported media type"),
        (b'{"inputs": []}', {"Content-Encoding": "gzip"}, 415, "Content-Encoding"),
    ],
)
def test_malformed_infer_requests(
    server: Running, body: bytes, headers: dict[str, str], status: int, match: str
) -> None:
    headers = {k: str(len(body)) if v == "LEN" else v for k, v in headers.items()}
    r = httpx.post(f"{server.url}/v2/models/vehicles/infer", content=body, headers=headers)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    assert re.search(match, r.json()["error"]), r.json()


def test_nan_input_is_refused(server: Running) -> None:
    x = np.zeros((1, 3, SIZE, SIZE), dtype="<f4")
    x[0, 0, 0, 0] = np.nan
    head = (
        b'{"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32",'
        b' "parameters": {"binary_data_size": 12288}}]}'
    )
    r = httpx.post(
        f"{server.url}/v2/models/vehicles/infer",
        content=head + x.tobytes(),
        headers={"Inference-Header-Content-Length": str(len(head))},
    )
    assert r.status_code == 400 and "NaN" in r.json()["error"]

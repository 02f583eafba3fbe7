"""Open Inference Protocol v2, exercised with the official Triton HTTP client as it is."""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.deploy.conftest import LABELS, SIZE, Running, image_bytes, reference_labels
from tests.test_images import encoded, png_declaring


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


# -- BYTES tensors: encoded images, as KServe and Triton image clients send them ----------------
def b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


def bytes_head(n: int, size: int, shape: list[int] | None = None) -> bytes:
    return orjson.dumps({"inputs": [{"name": "input", "shape": shape or [n], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": size}}]})  # fmt: skip


def framed(*images: bytes) -> bytes:
    """A binary BYTES tensor: each element after its 4-byte little-endian length."""
    return b"".join(struct.pack("<I", len(b)) + b for b in images)


def infer_raw(server: Running, body: bytes, head_length: int | None = None) -> httpx.Response:
    headers = {} if head_length is None else {"Inference-Header-Content-Length": str(head_length)}
    return httpx.post(f"{server.url}/v2/models/vehicles/infer", content=body, headers=headers)


@pytest.mark.parametrize("shape", ["n", "n,1"])
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "base64"])
def test_bytes_images_match_v1_and_are_logged(
    client: triton.InferenceServerClient, server: Running, model_bytes: bytes,
    binary: bool, shape: str,
) -> None:  # fmt: skip
    images = [image_bytes(80), image_bytes(81, "JPEG"), image_bytes(82)]
    dims = [3] if shape == "n" else [3, 1]
    elements = images if binary else [b64(b) for b in images]
    inp = triton.InferInput("input", dims, "BYTES")
    inp.set_data_from_numpy(np.array(elements, dtype=np.object_).reshape(dims), binary_data=binary)
    result = client.infer("vehicles", [inp], parameters={"camera_id": "cam-9"})
    logits = result.as_numpy("logits")
    assert [LABELS[i] for i in logits.argmax(axis=1)] == reference_labels(model_bytes, images)
    ids = result.get_response()["parameters"]["prediction_ids"].split(",")
    assert len(ids) == 3
    # The same pixels as /v1: the same logits as the same images sent there.
    files = [("f", (f"{i}", b, "image/png")) for i, b in enumerate(images)]
    v1 = httpx.post(f"{server.url}/v1/models/vehicles/predict", files=files)
    probs = [[p["probabilities"][label] for label in LABELS] for p in v1.json()["predictions"]]
    z = logits - logits.max(axis=1, keepdims=True)
    np.testing.assert_allclose(np.exp(z) / np.exp(z).sum(axis=1, keepdims=True), probs, atol=1e-5)
    assert server.state.predlog.flush(10)
    store = server.project.store()
    try:
        rows = {row.id: row for row in store.predictions.find("vehicles", 1)}
    finally:
        store.close()
    for pid, data in zip(ids, images, strict=True):
        row = rows[pid]
        assert row.source == "v2" and row.request_metadata == {"camera_id": "cam-9"}
        assert row.input_stats["bytes"] == len(data)


def test_bytes_classification_and_kserve_json(server: Running, model_bytes: bytes) -> None:
    image = image_bytes(83)
    body = orjson.dumps({
        "id": "k-1",
        "inputs": [{"name": "input", "shape": [1], "datatype": "BYTES", "data": [b64(image)]}],
        "outputs": [{"name": "logits", "parameters": {"classification": 2}}],
    })  # fmt: skip
    r = infer_raw(server, body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["id"] == "k-1"
    (logits,) = out["outputs"]
    assert logits["datatype"] == "BYTES" and logits["shape"] == [1, 2]
    assert logits["data"][0].split(":")[2] == reference_labels(model_bytes, [image])[0]


@pytest.mark.parametrize(
    ("images", "status", "words"),
    [
        ([png_declaring(14000, 14000)], 413, ["image 1", "too many pixels"]),
        (["good", png_declaring(13000, 13000)], 413, ["image 2", "too many pixels"]),
        ([encoded("BMP")], 415, ["image 1", "not a JPEG or PNG"]),
        (["good", "truncated"], 400, ["image 2", "cannot decode image"]),
        ([b""], 400, ["image 1", "empty"]),
    ],
)
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "base64"])
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_bad_bytes_images_fail_as_on_v1(
    server: Running, images: list[Any], status: int, words: list[str], binary: bool
) -> None:
    named = {"good": image_bytes(84), "truncated": image_bytes(85)[:200]}
    data = [named.get(b, b) if isinstance(b, str) else b for b in images]
    if binary:
        raw = framed(*data)
        head = bytes_head(len(data), len(raw))
        r = infer_raw(server, head + raw, len(head))
    else:
        tensor = {"name": "input", "shape": [len(data)], "datatype": "BYTES",
                  "data": [b64(b) for b in data]}  # fmt: skip
        r = infer_raw(server, orjson.dumps({"inputs": [tensor]}))
    assert r.status_code == status, r.text
    message = r.json()["error"]
    assert all(w.lower() in message.lower() for w in words), message


def test_too_many_bytes_images_is_a_413(server: Running) -> None:
    limit = server.state.settings.max_images_per_request
    body = orjson.dumps({"inputs": [{"name": "input", "shape": [limit + 1], "datatype": "BYTES",
                                     "data": [b64(b"x")] * (limit + 1)}]})  # fmt: skip
    r = infer_raw(server, body)
    assert r.status_code == 413 and f"at most {limit}" in r.json()["error"], r.text


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda img: (bytes_head(1, 3), b"\1\0\0"), "truncated length prefix"),
        (lambda img: (bytes_head(1, 4 + 10), struct.pack("<I", 99) + img[:10]), "declares 99"),
        (lambda img: (bytes_head(1, 2 * (4 + len(img))), framed(img, img)), "more than the 1"),
        (lambda img: (bytes_head(2, 4 + len(img)), framed(img)), "holds 1 elements"),
        (lambda img: (bytes_head(1, 10**6), framed(img)), "fewer than"),
        (lambda img: (bytes_head(1, 4 + len(img), [1, 3]), framed(img)), "expected \\[N\\] or"),
        (lambda img: (bytes_head(1, 4 + len(img), [0]), b""), "expected \\[N\\] or"),
        (lambda img: (bytes_head(1, 4 + len(img)), framed(img) + b"\0"), "belong to no input"),
    ],
)
def test_malformed_binary_bytes_tensors(server: Running, make: Any, match: str) -> None:
    head, raw = make(image_bytes(86))
    r = infer_raw(server, head + raw, len(head))
    assert r.status_code == 400, r.text
    assert re.search(match, r.json()["error"]), r.json()


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (["not base64!"], "element 1 is not base64"),
        ([1], "list of base64 strings"),
        ("abc", "list of base64 strings"),
        ([b64(b"a"), b64(b"b")], "has 2 elements but its shape needs 1"),
    ],
)
def test_malformed_json_bytes_tensors(server: Running, data: Any, match: str) -> None:
    body = orjson.dumps(
        {"inputs": [{"name": "input", "shape": [1], "datatype": "BYTES", "data": data}]}
    )
    r = infer_raw(server, body)
    assert r.status_code == 400, r.text
    assert re.search(match, r.json()["error"]), r.json()


def test_openapi_declares_bytes_inputs(server: Running) -> None:
    paths = httpx.get(f"{server.url}/openapi.json").json()["paths"]
    body = paths["/v2/models/{name}/infer"]["post"]["requestBody"]["content"]
    tensor = body["application/json"]["schema"]["properties"]["inputs"]["items"]
    assert tensor["properties"]["datatype"]["enum"] == ["FP32", "UINT8", "BYTES"]
    assert "binary_data_size" in tensor["properties"]["parameters"]["properties"]
    assert "application/octet-stream" in body

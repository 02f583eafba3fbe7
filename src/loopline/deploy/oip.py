"""Open Inference Protocol v2 (KServe / Triton REST): the codec and its endpoints.

Implements the health, server and model metadata, model readiness and inference endpoints,
the binary tensor data extension (``Inference-Header-Content-Length``), the classification
extension (``"classification": k`` on an output) and Triton's ``/config``. Inputs may be
FP32 or UINT8 tensors [N, 3, H, W], as JSON (flat or nested) or binary, or BYTES tensors of
encoded JPEG/PNG images, shape [N] or [N, 1], as KServe's and Triton's image clients send
them: base64 strings in JSON ``data``, or raw in the binary extension, each element after
its 4-byte little-endian length. Images are decoded on the batcher threads exactly as the
images of ``/v1`` predict (the same limits and errors), and batched with them. Errors are
``{"error": "..."}``.

Custom request ``parameters`` (anything not reserved by the protocol) are kept with the
predictions as request metadata, like the query parameters of ``/v1`` predict.
"""

from __future__ import annotations

import binascii
import math
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
from fastapi import FastAPI, Request, Response

from loopline import __version__
from loopline.deploy import openapi
from loopline.deploy.fastroute import add_fast_post
from loopline.deploy.limits import RequestRejected, json_body, media_type, unsupported_type
from loopline.deploy.v1 import too_many_images

if TYPE_CHECKING:
    from loopline.deploy.runtime import ServedModel
    from loopline.deploy.state import ServerState

DATATYPES: dict[str, Any] = {"FP32": np.dtype("<f4"), "UINT8": np.dtype("u1")}
BYTES = "BYTES"  # encoded images, one per element
RESERVED_PARAMETERS = frozenset(
    {"binary_data_output", "sequence_id", "sequence_start", "sequence_end", "priority", "timeout"}
)
JSON_TYPES = frozenset({"", "application/json", "application/octet-stream"})


def bad(message: str) -> RequestRejected:
    return RequestRejected(message, 400)


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool
    classification: int


@dataclass
class InferRequest:
    """A parsed inference request: the input, as float32 [N, 3, H, W] (``tensor``) or as
    encoded images (``images``, from a BYTES tensor), and what to return."""

    id: str | None
    tensor: np.ndarray | None
    outputs: list[RequestedOutput]
    parameters: dict[str, Any]
    images: list[bytes] | None = None


def parse_infer_request(
    body: bytes,
    header_length: str | None,
    *,
    input_name: str,
    item_shape: list[int],
    output_names: list[str],
    n_classes: int,
    max_items: int,
) -> InferRequest:
    """Decode a v2 inference request (JSON, or JSON + binary tensors); 400 on any mistake."""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise bad("Inference-Header-Content-Length must be an integer") from None
        if not 0 <= n <= len(body):
            raise bad(
                f"Inference-Header-Content-Length {n} does not fit the body of {len(body)} bytes"
            )
        head, binary = body[:n], memoryview(body)[n:]
    else:
        head, binary = body, memoryview(b"")
    req = json_body(head, "an inference request, a JSON object with 'inputs'")
    if not isinstance(req, dict):
        raise bad("the request must be a JSON object with 'inputs'")
    inputs = req.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise bad("'inputs' must be a non-empty list of tensors")
    tensor: np.ndarray | None = None
    images: list[bytes] | None = None
    offset = 0
    for item in inputs:
        if not isinstance(item, dict):
            raise bad("each input must be an object with name, shape, datatype and data")
        name = item.get("name")
        if name != input_name:
            raise bad(f"unknown input {name!r}: the model takes one input, {input_name!r}")
        if tensor is not None or images is not None:
            raise bad(f"input {name!r} is given twice")
        if item.get("datatype") == BYTES:
            images, used = _read_images(item, binary[offset:], max_items)
        else:
            tensor, used = _read_input(item, binary[offset:], item_shape, max_items)
        offset += used
    if offset != len(binary):
        raise bad(f"{len(binary) - offset} bytes of binary data belong to no input")
    req_params = req.get("parameters") or {}
    if not isinstance(req_params, dict):
        raise bad("'parameters' must be an object")
    default_binary = bool(req_params.get("binary_data_output", False))
    outputs = _read_outputs(req.get("outputs"), output_names, default_binary, n_classes)
    request_id = req.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise bad("'id' must be a string")
    custom = {
        k: v
        for k, v in req_params.items()
        if k not in RESERVED_PARAMETERS and not k.startswith("triton_")
    }
    return InferRequest(request_id, tensor, outputs, custom, images)


def _read_images(
    item: dict[str, Any], binary: memoryview, max_items: int
) -> tuple[list[bytes], int]:
    """The encoded images of a BYTES input [N] or [N, 1]: base64 in ``data``, or raw binary
    elements, each after its 4-byte little-endian length. The images themselves are
    checked when they are decoded, as those of ``/v1``."""
    name = item["name"]
    shape = item.get("shape")
    if (
        not isinstance(shape, list)
        or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
        or len(shape) not in (1, 2)
        or shape[1:] not in ([], [1])
        or shape[0] < 1
    ):
        raise bad(
            f"input {name!r}: shape {shape} is not accepted for BYTES; expected [N] or [N, 1], "
            "one encoded JPEG or PNG image per element"
        )
    n = shape[0]
    if n > max_items:
        raise too_many_images(max_items, n)
    params = item.get("parameters") or {}
    if not isinstance(params, dict):
        raise bad(f"input {name!r}: 'parameters' must be an object")
    size = params.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise bad(f"input {name!r}: binary_data_size must be a non-negative integer")
        if size > len(binary):
            raise bad(f"input {name!r}: the body holds fewer than its {size} binary bytes")
        return _split_elements(name, binary[:size], n), size
    if "data" not in item:
        raise bad(f"input {name!r} has neither 'data' nor a binary_data_size parameter")
    data = item["data"]
    if isinstance(data, list) and len(shape) == 2:  # [[s1], [s2], ...] for [N, 1]
        data = [d[0] if isinstance(d, list) and len(d) == 1 else d for d in data]
    if not isinstance(data, list) or not all(isinstance(d, str) for d in data):
        raise bad(f"input {name!r}: BYTES 'data' must be a list of base64 strings")
    if len(data) != n:
        raise bad(f"input {name!r}: 'data' has {len(data)} elements but its shape needs {n}")
    images = []
    for i, text in enumerate(data):
        try:
            images.append(binascii.a2b_base64(text, strict_mode=True))
        except (binascii.Error, ValueError):
            raise bad(
                f"input {name!r}: element {i + 1} is not base64; send each image "
                "base64-encoded in JSON, or raw in the binary tensor extension"
            ) from None
    return images, 0


def _split_elements(name: str, raw: memoryview, n: int) -> list[bytes]:
    """The elements of a binary BYTES tensor: each a 4-byte little-endian length, then bytes."""
    out: list[bytes] = []
    pos, end = 0, len(raw)
    while pos < end:
        if len(out) == n:
            raise bad(f"input {name!r}: binary data holds more than the {n} elements of its shape")
        if end - pos < 4:
            raise bad(f"input {name!r}: element {len(out) + 1} has a truncated length prefix")
        (length,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if length > end - pos:
            raise bad(
                f"input {name!r}: element {len(out) + 1} declares {length} bytes, "
                f"{end - pos} are left"
            )
        out.append(bytes(raw[pos : pos + length]))
        pos += length
    if len(out) != n:
        raise bad(f"input {name!r}: binary data holds {len(out)} elements but its shape needs {n}")
    return out


def _read_input(
    item: dict[str, Any], binary: memoryview, item_shape: list[int], max_items: int
) -> tuple[np.ndarray, int]:
    name = item["name"]
    datatype = item.get("datatype")
    if datatype not in DATATYPES:
        raise bad(
            f"input {name!r}: datatype {datatype!r} is not supported; use FP32 or UINT8 "
            "(pixels), or BYTES (encoded JPEG/PNG images)"
        )
    shape = item.get("shape")
    if (
        not isinstance(shape, list)
        or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
        or len(shape) != 4
        or shape[1:] != item_shape
        or not 1 <= shape[0] <= max_items
    ):
        raise bad(
            f"input {name!r}: shape {shape} is not accepted; expected [N, "
            f"{', '.join(map(str, item_shape))}] with 1 <= N <= {max_items}"
        )
    count = math.prod(shape)
    dtype = DATATYPES[datatype]
    params = item.get("parameters") or {}
    if not isinstance(params, dict):
        raise bad(f"input {name!r}: 'parameters' must be an object")
    size = params.get("binary_data_size")
    if size is not None:
        expected = count * dtype.itemsize
        if not isinstance(size, int) or size != expected:
            raise bad(
                f"input {name!r}: binary_data_size {size!r} does not match its shape and "
                f"datatype ({expected} bytes)"
            )
        if size > len(binary):
            raise bad(f"input {name!r}: the body holds fewer than its {size} binary bytes")
        arr = np.frombuffer(binary[:size], dtype=dtype).reshape(shape)
        used = size
    else:
        if "data" not in item:
            raise bad(f"input {name!r} has neither 'data' nor a binary_data_size parameter")
        arr = _from_json(name, item["data"], datatype, count).reshape(shape)
        used = 0
    x = np.ascontiguousarray(arr, dtype=np.float32)
    if datatype == "FP32" and not np.isfinite(x).all():
        raise bad(f"input {name!r} contains NaN or infinity")
    return x, used


def _from_json(name: str, data: Any, datatype: str, count: int) -> np.ndarray:
    try:
        arr = np.asarray(data)
    except (ValueError, TypeError):
        raise bad(f"input {name!r}: 'data' is not a rectangular array of numbers") from None
    if arr.dtype.kind not in "biuf":
        raise bad(f"input {name!r}: 'data' must hold numbers only")
    if arr.size != count:
        raise bad(f"input {name!r}: 'data' has {arr.size} values but its shape needs {count}")
    if datatype == "UINT8":
        if arr.dtype.kind not in "biu" or (arr.size and (arr.min() < 0 or arr.max() > 255)):
            raise bad(f"input {name!r}: UINT8 data must be integers from 0 to 255")
        return arr.astype(np.uint8).reshape(-1)
    return arr.astype(np.float32).reshape(-1)


def _read_outputs(
    raw: Any, names: list[str], default_binary: bool, n_classes: int
) -> list[RequestedOutput]:
    if raw is None:
        return [RequestedOutput(n, default_binary, 0) for n in names]
    if not isinstance(raw, list):
        raise bad("'outputs' must be a list")
    out = []
    for item in raw:
        name = item.get("name") if isinstance(item, dict) else None
        if name not in names:
            raise bad(f"unknown output {name!r}: the model has {names}")
        params = item.get("parameters") or {}
        if not isinstance(params, dict):
            raise bad(f"output {name!r}: 'parameters' must be an object")
        k = params.get("classification", 0)
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= n_classes:
            raise bad(f"output {name!r}: classification must be an integer from 0 to {n_classes}")
        out.append(RequestedOutput(name, bool(params.get("binary_data", default_binary)), k))
    return out


def render_infer_response(
    *,
    model_name: str,
    model_version: str,
    request_id: str | None,
    outputs: list[RequestedOutput],
    values: dict[str, np.ndarray],
    labels: list[str],
    prediction_ids: list[str],
) -> tuple[bytes, dict[str, str], str]:
    """The response body, extra headers and media type for a v2 inference answer."""
    heads: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for o in outputs:
        arr = values[o.name]
        if o.classification:
            strings = _classify(arr, o.classification, labels)
            entry: dict[str, Any] = {
                "name": o.name,
                "datatype": "BYTES",
                "shape": [len(arr), o.classification],
            }
            if o.binary:
                raw = b"".join(struct.pack("<I", len(s)) + s for s in strings)
            else:
                entry["data"] = [s.decode() for s in strings]
        else:
            entry = {"name": o.name, "datatype": "FP32", "shape": list(arr.shape)}
            if o.binary:
                raw = np.ascontiguousarray(arr, dtype="<f4").tobytes()
            else:
                entry["data"] = arr.reshape(-1).tolist()
        if o.binary:
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        heads.append(entry)
    response: dict[str, Any] = {
        "model_name": model_name,
        "model_version": model_version,
        "outputs": heads,
        "parameters": {"prediction_ids": ",".join(prediction_ids)},
    }
    if request_id is not None:
        response["id"] = request_id
    head = orjson.dumps(response)
    if chunks:
        return (
            head + b"".join(chunks),
            {"Inference-Header-Content-Length": str(len(head))},
            "application/octet-stream",
        )
    return head, {}, "application/json"


def _classify(values: np.ndarray, k: int, labels: list[str]) -> list[bytes]:
    """Triton's classification strings ``"value:index:label"``, best first, k per row."""
    order = np.argsort(-values, axis=1, kind="stable")[:, :k]
    return [
        f"{values[r, i]:f}:{i}:{labels[i]}".encode()
        for r in range(len(values))
        for i in order[r].tolist()
    ]


# -- endpoints ---------------------------------------------------------------------------------
def add_routes(app: FastAPI, state: ServerState) -> None:
    # The versions served may change while the server runs (``--env``): each answer is
    # built from the version it is about.
    def model_meta(served: ServedModel) -> dict[str, Any]:
        runtime = served.runtime
        return {
            "name": served.name,
            "versions": [str(v) for v in state.router.table.versions],
            "platform": "onnxruntime_onnx",
            "inputs": [{"name": runtime.input_name, "datatype": "FP32",
                        "shape": [-1, *runtime.input_shape]}],
            "outputs": [{"name": runtime.output_name, "datatype": "FP32",
                         "shape": [-1, len(served.labels)]}],
        }  # fmt: skip

    def model_config(served: ServedModel) -> dict[str, Any]:
        runtime = served.runtime
        return {
            "name": served.name,
            "platform": "onnxruntime_onnx",
            "backend": "onnxruntime",
            "max_batch_size": state.settings.max_images_per_request,
            "input": [{"name": runtime.input_name, "data_type": "TYPE_FP32",
                       "format": "FORMAT_NCHW", "dims": runtime.input_shape}],
            "output": [{"name": runtime.output_name, "data_type": "TYPE_FP32",
                        "dims": [len(served.labels)], "label_filename": "labels.json"}],
            "dynamic_batching": {
                "max_queue_delay_microseconds": int(state.settings.max_delay_ms * 1000),
                "preferred_batch_size": [state.settings.max_batch_size],
            },
        }  # fmt: skip

    server_meta = orjson.dumps(
        {
            "name": "loopline",
            "version": __version__,
            "extensions": ["binary_tensor_data", "classification", "model_configuration"],
        }
    )

    def json_response(data: Any, status: int = 200) -> Response:
        body = data if isinstance(data, bytes) else orjson.dumps(data)
        return Response(body, status_code=status, media_type="application/json")

    @app.get("/v2", tags=["v2"], summary="Server metadata")
    async def server_metadata() -> Response:
        return json_response(server_meta)

    @app.get("/v2/health/live", tags=["v2"], summary="The process is up")
    async def live() -> Response:
        return json_response({"live": True})

    @app.get("/v2/health/ready", tags=["v2"], summary="The model is loaded and serving")
    async def ready() -> Response:
        if not state.ready:
            return json_response({"error": state.not_ready_reason()}, 503)
        return json_response({"ready": True})

    async def model_metadata(request: Request) -> Response:
        state.check_model(request.path_params)
        return json_response(model_meta(state.served_for(request.path_params)))

    async def model_ready(request: Request) -> Response:
        state.check_model(request.path_params)
        if not state.ready:
            return json_response({"error": state.not_ready_reason()}, 503)
        return json_response({"name": state.served.name, "ready": True})

    async def config(request: Request) -> Response:
        state.check_model(request.path_params)
        return json_response(model_config(state.served_for(request.path_params)))

    async def infer(request: Request) -> Response:
        state.check_model(request.path_params)
        served = state.served_for(request.path_params)  # whose input the request must fit
        runtime = served.runtime
        if state.settings.require_token_for_predict:
            state.auth.require(request.headers, "inference")
        headers = request.headers
        mime = media_type(headers)
        if mime not in JSON_TYPES:
            raise unsupported_type(mime, "application/json (binary tensors: octet-stream)")
        encoding = headers.get("content-encoding", "identity").lower()
        if encoding != "identity":
            raise RequestRejected(
                f"Content-Encoding {encoding!r} is not supported; send the request uncompressed",
                415,
            )
        body = await request.body()
        req = parse_infer_request(
            body,
            headers.get("inference-header-content-length"),
            input_name=runtime.input_name,
            item_shape=runtime.input_shape,
            output_names=[runtime.output_name],
            n_classes=len(served.labels),
            max_items=state.settings.max_images_per_request,
        )
        metadata = state.check_metadata(req.parameters)
        routed = await state.router.submit(
            images=req.images,
            tensor=req.tensor,
            metadata=metadata,
            source="v2",
            version=request.path_params.get("version"),
        )
        result, answered = routed.result, routed.served  # the version that answered
        if req.images is not None:
            state.capture.offer(result.ids, req.images)  # never blocks or fails
        content, extra, media = render_infer_response(
            model_name=answered.name,
            model_version=str(answered.version),
            request_id=req.id,
            outputs=req.outputs,
            values={runtime.output_name: result.logits},
            labels=answered.labels,
            prediction_ids=result.ids,
        )
        return Response(content, headers=extra, media_type=media)

    for base in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        add_fast_post(
            app, base + "/infer", infer, summary="Inference", tags=["v2"],
            openapi={"requestBody": openapi.INFER_BODY, "parameters": [openapi.INFER_HEADER]},
        )  # fmt: skip
        app.get(base, tags=["v2"], summary="Model metadata")(model_metadata)
        app.get(base + "/ready", tags=["v2"], summary="The model is ready")(model_ready)
        app.get(base + "/config", tags=["v2"], summary="Model configuration (Triton)")(config)

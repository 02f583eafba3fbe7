"""The images API: predict on JPEG/PNG images, report ground truth, and a little admin.

``POST /v1/models/{name}/predict`` takes one image as the raw body (``image/jpeg``,
``image/png`` or ``application/octet-stream``) or one or many as ``multipart/form-data``.
Metadata comes as query parameters, as plain multipart fields, or as a multipart field
``metadata`` holding a JSON object; it is kept with every prediction of the request.

``POST /v1/feedback`` takes ``{"prediction_id", "label"}``, a list of them, or
``{"items": [...]}``, and answers per item.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import FastAPI, Request, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from loopline.deploy import openapi
from loopline.deploy.fastroute import add_fast_post
from loopline.deploy.limits import (
    IMAGE_TYPES,
    RequestRejected,
    json_body,
    media_type,
    unsupported_type,
)
from loopline.errors import NotFound

if TYPE_CHECKING:
    from loopline.deploy.runtime import JobResult, ServedModel
    from loopline.deploy.state import ServerState

MAX_FEEDBACK_ITEMS = 10_000
IMAGE_HELP = "image/jpeg, image/png, application/octet-stream, or multipart/form-data"


def render_predictions(served: ServedModel, result: JobResult) -> bytes:
    """The answer of ``served`` (the version that gave it) as the v1 JSON body."""
    labels = served.labels
    version = served.version
    predictions = [
        {
            "prediction_id": pid,
            "label": labels[top],
            "confidence": conf,
            "probabilities": dict(zip(labels, probs, strict=True)),
            "model_version": version,
        }
        for pid, top, conf, probs in zip(
            result.ids,
            result.top.tolist(),
            result.confidence.tolist(),
            result.probabilities.tolist(),
            strict=True,
        )
    ]
    return orjson.dumps(
        {"model": served.name, "model_version": version, "predictions": predictions}
    )


async def read_images(request: Request, state: ServerState) -> tuple[list[bytes], dict[str, Any]]:
    """The request's images and metadata (query parameters and multipart fields)."""
    metadata: dict[str, Any] = dict(request.query_params)
    mime = media_type(request.headers)
    if mime in IMAGE_TYPES:
        body = await request.body()
        if not body:
            raise RequestRejected(f"empty body: send a JPEG or PNG image ({IMAGE_HELP})")
        return [body], metadata
    if mime != "multipart/form-data":
        raise unsupported_type(mime, IMAGE_HELP)
    limit = state.settings.max_images_per_request
    images: list[bytes] = []
    try:
        form = await request.form(max_files=limit, max_fields=state.settings.max_metadata_keys + 1)
    except StarletteHTTPException as err:  # Starlette says 400 for every multipart mistake
        if str(err.detail).startswith("Too many files"):
            raise too_many_images(limit) from None
        if str(err.detail).startswith("Too many fields"):
            raise RequestRejected(
                f"too much metadata: more than {state.settings.max_metadata_keys} fields"
            ) from None
        raise
    try:
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                part = (value.content_type or "application/octet-stream").split(";")[0].lower()
                if part not in IMAGE_TYPES:
                    raise unsupported_type(part, f"image parts as {IMAGE_HELP}")
                images.append(await value.read())
            elif key == "metadata":
                try:
                    extra = orjson.loads(value)
                except orjson.JSONDecodeError:
                    raise RequestRejected("the 'metadata' field must be a JSON object") from None
                if not isinstance(extra, dict):
                    raise RequestRejected("the 'metadata' field must be a JSON object")
                metadata.update(extra)
            else:
                metadata[key] = value
    finally:
        await form.close()
    if not images:
        raise RequestRejected("no image in the multipart body: send images as file fields")
    return images, metadata


def too_many_images(limit: int, count: int | None = None) -> RequestRejected:
    given = f"{count}, " if count is not None else ""
    return RequestRejected(f"too many images: {given}at most {limit} per request", 413)


def parse_feedback(body: bytes) -> list[Any]:
    """The items of a feedback request (each still to be validated one by one)."""
    data = json_body(body, '{"prediction_id": ..., "label": ...} or a list of them')
    if isinstance(data, dict) and "items" in data:
        data = data["items"]
    elif isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not data:
        raise RequestRejected(
            'send {"prediction_id": ..., "label": ...}, a non-empty list of them, '
            'or {"items": [...]}'
        )
    if len(data) > MAX_FEEDBACK_ITEMS:
        raise RequestRejected(f"too many feedback items: {len(data)}, at most {MAX_FEEDBACK_ITEMS}")
    return data


def add_routes(app: FastAPI, state: ServerState) -> None:
    async def predict(request: Request) -> Response:
        state.check_model(request.path_params)
        if state.settings.require_token_for_predict:
            state.auth.require(request.headers, "predict")
        images, metadata = await read_images(request, state)
        if len(images) > state.settings.max_images_per_request:
            raise too_many_images(state.settings.max_images_per_request, len(images))
        meta = state.check_metadata(metadata)
        routed = await state.router.submit(
            images=images, metadata=meta, source="v1", version=request.path_params.get("version")
        )
        result = routed.result
        state.capture.offer(result.ids, images)  # never blocks or fails (deploy/capture.py)
        return Response(render_predictions(routed.served, result), media_type="application/json")

    for path in ("/v1/models/{name}/predict", "/v1/models/{name}/versions/{version}/predict"):
        add_fast_post(
            app, path, predict, summary="Predict on JPEG/PNG images", tags=["v1"],
            openapi={"requestBody": openapi.IMAGE_BODY, "parameters": [openapi.METADATA_QUERY],
                     "responses": openapi.PREDICTIONS_RESPONSE},
        )  # fmt: skip

    @app.get("/v1/models/{name}", tags=["v1"], summary="The served model")
    async def model_info(request: Request) -> Response:
        state.check_model(request.path_params)
        served = state.served
        spec = served.runtime.spec
        table = state.router.table
        return Response(
            orjson.dumps(
                {
                    "name": served.name,
                    "version": served.version,
                    "labels": served.labels,
                    "input": {"height": spec.height, "width": spec.width, "color": spec.color},
                    "bundle_sha256": served.bundle_sha256,
                    "metrics": served.bundle.metadata.get("metrics", {}),
                    "versions": table.versions,
                    "deployment": table.deployment,  # None unless it serves an environment
                }
            ),
            media_type="application/json",
        )

    @app.post(
        "/v1/feedback",
        tags=["v1"],
        summary="Ground-truth labels for predictions",
        openapi_extra={"requestBody": openapi.FEEDBACK_BODY},
    )
    async def feedback(request: Request) -> Response:
        state.auth.require(request.headers, "feedback")
        if state.store is None or state.predlog is None:
            raise NotFound("feedback needs the prediction log, which is off on this server")
        mime = media_type(request.headers)
        if mime != "application/json":
            raise unsupported_type(mime, "application/json")
        items = parse_feedback(await request.body())
        pairs: list[tuple[str, str]] = []
        results: list[dict[str, Any] | None] = []
        for item in items:
            pid = item.get("prediction_id") if isinstance(item, dict) else None
            label = item.get("label") if isinstance(item, dict) else None
            if not isinstance(pid, str) or not isinstance(label, str) or not pid:
                results.append(
                    {
                        "prediction_id": pid if isinstance(pid, str) else None,
                        "status": "error",
                        "code": "invalid_item",
                        "error": "each item needs a string prediction_id and a string label",
                    }
                )
            else:
                pairs.append((pid, label))
                results.append(None)
        # Predictions answered a moment ago may still wait in the log's buffer.
        await run_in_threadpool(state.predlog.flush, 10.0)
        record = state.store.predictions.record_feedback
        labels = state.labels()
        stored = await run_in_threadpool(record, pairs, labels)
        if state.settings.workers > 1:
            # Another worker process may still hold some ids: wait one flush interval.
            missing = [i for i, r in enumerate(stored) if r.get("code") == "unknown_prediction"]
            if missing:
                await asyncio.sleep(min(state.settings.flush_interval_s * 1.5 + 0.1, 10.0))
                again = await run_in_threadpool(record, [pairs[i] for i in missing], labels)
                for i, r in zip(missing, again, strict=True):
                    stored[i] = r
        answers = iter(stored)
        merged = [r if r is not None else next(answers) for r in results]
        counts = {"recorded": 0, "updated": 0, "unchanged": 0, "error": 0}
        for r in merged:
            counts[r["status"]] += 1
        errors = counts.pop("error")
        body = {"results": merged, **counts, "errors": errors}
        return Response(orjson.dumps(body), media_type="application/json")

    @app.post("/v1/admin/flush", tags=["admin"], summary="Write the prediction log now")
    async def flush(request: Request) -> Response:
        state.auth.require(request.headers, "admin")
        ok = True
        if state.predlog is not None:
            ok = await run_in_threadpool(state.predlog.flush, 30.0)
        pending = state.predlog.pending if state.predlog is not None else 0
        return Response(
            orjson.dumps({"flushed": ok, "pending": pending}),
            status_code=200 if ok else 503,
            media_type="application/json",
        )

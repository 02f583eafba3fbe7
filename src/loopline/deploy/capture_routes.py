"""``GET /v1/predictions/{prediction_id}/image``: a captured request image, for token holders.

Captured CCTV frames are personal data: the route needs a bearer token (401 without one),
answers 404 for an unknown or purged capture, and serves the bytes only after the blob
hashes to the digest its capture row names (a tampered blob is a 500, never served).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import FastAPI, Request, Response
from starlette.concurrency import run_in_threadpool

from loopline.deploy.capture import CaptureWriter
from loopline.errors import NotFound

if TYPE_CHECKING:
    from loopline.deploy.state import ServerState


def add_routes(app: FastAPI, state: ServerState) -> None:
    @app.get(
        "/v1/predictions/{prediction_id}/image",
        tags=["v1"],
        summary="The captured image of a prediction (needs a bearer token)",
        responses={200: {"content": {"image/jpeg": {}, "image/png": {}}}},
    )
    async def captured_image(prediction_id: str, request: Request) -> Response:
        state.auth.require(request.headers, "reading a captured image")
        writer = state.capture
        if not isinstance(writer, CaptureWriter):
            raise NotFound("capture is off on this server: no captured images to read here")
        record = await run_in_threadpool(writer.captures.get, prediction_id)
        if record is None:
            raise NotFound(f"no captured image for prediction {prediction_id!r}")
        # get_bytes re-hashes the blob and raises IntegrityError on a mismatch.
        data = await run_in_threadpool(writer.artifacts.get_bytes, record.sha256)
        return Response(
            data,
            media_type=record.media_type,
            headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"},
        )

"""``GET /v1/predictions/{prediction_id}/image``: a captured request image, for token holders.

Captured CCTV frames are personal data: the route needs a bearer token (401 without one),
answers 404 for an unknown or purged capture, and serves the bytes only after the blob
hashes to the digest its capture row names (a tampered blob is a 500, never served).

With ``capture_read_token`` set (an environment's ``capture: {read_token: ${VAR}}``), only
that scope may read images: a client token, good for predict and feedback, gets 403. Without
it, the server's tokens may.
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request, Response
from starlette.concurrency import run_in_threadpool

from loopline.deploy.auth import BearerAuth
from loopline.deploy.capture import CaptureWriter
from loopline.deploy.limits import RequestRejected
from loopline.errors import NotFound

if TYPE_CHECKING:
    from loopline.deploy.state import ServerState

WHAT = "reading a captured image"


class CaptureReadAuth:
    """The capture read scope: only ``read_tokens`` pass; a client token is told why not."""

    def __init__(self, read_tokens: list[str], client_tokens: list[str]) -> None:
        self._read = BearerAuth(read_tokens)
        self._clients = [t.encode() for t in client_tokens if t]

    def require(self, headers: Any) -> None:
        try:
            self._read.require(headers, WHAT)
        except RequestRejected as err:
            _, _, given = (headers.get("authorization") or "").partition(" ")
            credential = given.strip().encode()
            ok = False
            for token in self._clients:  # every one, in constant time each
                ok |= hmac.compare_digest(credential, token)
            if credential and ok:
                raise RequestRejected(
                    f"{WHAT} needs the capture read token (capture_read_token); the client "
                    "token given may predict and send feedback, not read captured images",
                    403,
                ) from None
            raise err from None


def add_routes(app: FastAPI, state: ServerState) -> None:
    read_tokens = state.settings.capture_read_tokens()
    scoped = CaptureReadAuth(read_tokens, state.settings.tokens()) if read_tokens else None

    @app.get(
        "/v1/predictions/{prediction_id}/image",
        tags=["v1"],
        summary="The captured image of a prediction (needs a bearer token)",
        responses={200: {"content": {"image/jpeg": {}, "image/png": {}}}},
    )
    async def captured_image(prediction_id: str, request: Request) -> Response:
        if scoped is not None:
            scoped.require(request.headers)
        else:
            state.auth.require(request.headers, WHAT)
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

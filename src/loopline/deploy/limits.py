"""What a client may send: body size, content types, and the 4xx errors that say so.

The body limit is a pure ASGI middleware, so it costs a header scan per request: a declared
``Content-Length`` over the limit is refused before the body is read, and a chunked body is
counted as it arrives.
"""

from __future__ import annotations

from typing import Any

import orjson

from loopline.errors import InvalidInput

IMAGE_TYPES = frozenset({"image/jpeg", "image/jpg", "image/png", "application/octet-stream"})


class RequestRejected(InvalidInput):
    """A client's request cannot be accepted; ``status_code`` says how (400, 413, 415...)."""

    def __init__(self, message: str, status_code: int = 400) -> None:
        super().__init__(message)
        self.status_code = status_code


class PayloadTooLarge(RequestRejected):
    def __init__(self, limit: int) -> None:
        super().__init__(f"request body is larger than the limit of {limit} bytes", 413)


def media_type(headers: Any) -> str:
    """The bare media type of a Content-Type header: lower case, parameters dropped."""
    return headers.get("content-type", "").split(";", 1)[0].strip().lower()


def unsupported_type(mime: str, allowed: str) -> RequestRejected:
    got = f"Content-Type {mime!r}" if mime else "a missing Content-Type"
    return RequestRejected(f"unsupported media type: {got}; send {allowed}", 415)


def json_body(body: bytes | memoryview, expected: str) -> Any:
    """Parse a JSON request body; an empty or malformed one is a 400 naming ``expected``."""
    if not body:
        raise RequestRejected(f"empty body: send {expected}")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as err:
        raise RequestRejected(f"the body is not valid JSON ({err}); send {expected}") from None


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_body_bytes`` with 413 and a JSON error."""

    def __init__(self, app: Any, max_body_bytes: int) -> None:
        self.app = app
        self.limit = max_body_bytes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit
        for key, value in scope["headers"]:
            if key == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared < 0 or declared > limit:
                    await _send_error(send, 413 if declared > limit else 400, declared, limit)
                    return
                # A declared length is enforced by the HTTP parser; no counting needed.
                await self.app(scope, receive, send)
                return
        received = 0

        async def counted() -> Any:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLarge(limit)
            return message

        await self.app(scope, counted, send)


async def _send_error(send: Any, status: int, declared: int, limit: int) -> None:
    if status == 413:
        msg = f"request body of {declared} bytes is larger than the limit of {limit} bytes"
    else:
        msg = "invalid Content-Length header"
    body = orjson.dumps({"error": msg})
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})

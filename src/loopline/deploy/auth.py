"""Bearer tokens: required on every endpoint that writes, optionally on predict.

Tokens come from ``LOOPLINE_SERVE_TOKEN`` (or ``--token-file``); several comma-separated
tokens are all valid, so a token can be rotated without downtime. With no token configured,
write endpoints are closed (403) rather than open: a server never accepts anonymous writes.
"""

from __future__ import annotations

import hmac
from typing import Any

from loopline.deploy.limits import RequestRejected


class Unauthorized(RequestRejected):
    """No valid bearer token (401, with ``WWW-Authenticate: Bearer``)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 401)


class BearerAuth:
    """Checks ``Authorization: Bearer <token>`` against the configured tokens."""

    def __init__(self, tokens: list[str]) -> None:
        self._tokens = [t.encode() for t in tokens if t]

    @property
    def configured(self) -> bool:
        return bool(self._tokens)

    def require(self, headers: Any, what: str = "this endpoint") -> None:
        """Raise 401/403 unless ``headers`` carry a valid token."""
        if not self._tokens:
            raise RequestRejected(
                f"{what} needs a bearer token, and this server has none configured: "
                "start it with LOOPLINE_SERVE_TOKEN set (or --token-file)",
                403,
            )
        header = headers.get("authorization")
        if not header:
            raise Unauthorized(f"{what} needs a bearer token: send 'Authorization: Bearer <token>'")
        scheme, _, credential = header.partition(" ")
        if scheme.lower() != "bearer" or not credential.strip():
            raise Unauthorized("malformed Authorization header: expected 'Bearer <token>'")
        given = credential.strip().encode()
        # Compare against every token (no early exit), in constant time each.
        ok = False
        for token in self._tokens:
            ok |= hmac.compare_digest(given, token)
        if not ok:
            raise Unauthorized("invalid bearer token")

"""Plain Starlette routes for the hot endpoints (predict, infer).

A FastAPI route pays for dependency solving and its request wrappers on every request:
about 50 microseconds of CPU more than a plain Starlette route here, which is a few
percent of a whole prediction. The hot endpoints take the raw ``Request`` and return a
``Response`` anyway, so they are served by a plain route, and listed in the OpenAPI schema
by a FastAPI route behind it that the router never reaches.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from enum import Enum
from typing import Any

from fastapi import FastAPI, Request, Response
from starlette.routing import Match, Route
from starlette.types import Scope


class FastRoute(Route):
    """A Starlette route that sets ``scope["route"]`` as FastAPI's do (metrics label by it)."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child = super().matches(scope)
        if match is not Match.NONE:
            child["route"] = self
        return match, child


def add_fast_post(
    app: FastAPI,
    path: str,
    endpoint: Callable[[Request], Awaitable[Response]],
    *,
    summary: str,
    tags: list[str | Enum],
    openapi: dict[str, Any],
) -> None:
    """Serve ``POST path`` with a ``FastRoute`` in front of every other route.

    ``openapi`` is merged into the operation's OpenAPI description (its request body,
    parameters and responses), which FastAPI cannot infer from a raw-``Request`` endpoint.
    """
    app.router.routes.insert(0, FastRoute(path, endpoint, methods=["POST"]))
    app.post(path, summary=summary, tags=list(tags), openapi_extra=openapi)(endpoint)

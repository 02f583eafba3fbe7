"""The hot endpoints (predict, infer), served in front of FastAPI's middleware stack.

A FastAPI app runs every request through about ten layers (error and telemetry
middleware, body limits, exception middleware, an exit stack, the router, a request
wrapper), each wrapping ``send`` once more: on a profile of the server under load they
held more of the GIL than the predict endpoint itself. The hot endpoints take the raw
``Request`` and return a ``Response`` anyway, so ``add_fast_post`` registers them with a
``HotPath`` that the app's middleware stack starts with: a POST to one of their paths goes
through the app's own user middleware (metrics, body limit) around the endpoint, with the
app's exception handlers applied as FastAPI would apply them; every other request goes to
FastAPI's stack unchanged. They are also listed in the OpenAPI schema by a FastAPI route
that the router never reaches.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from enum import Enum
from typing import Any

from fastapi import FastAPI, Request, Response
from starlette._utils import is_async_callable
from starlette.concurrency import run_in_threadpool
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_HOT_ROUTES = "loopline_hot_routes"  # the app's FastRoutes, on app.state


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
    """Serve ``POST path`` by ``endpoint`` on the hot path, in front of every other route.

    ``openapi`` is merged into the operation's OpenAPI description (its request body,
    parameters and responses), which FastAPI cannot infer from a raw-``Request`` endpoint.
    """
    route = FastRoute(path, endpoint, methods=["POST"])
    routes: list[FastRoute] | None = getattr(app.state, _HOT_ROUTES, None)
    if routes is None:
        routes = []
        setattr(app.state, _HOT_ROUTES, routes)
        _install(app, routes)
    routes.append(route)
    app.router.routes.insert(0, route)  # the same route, should a request reach the router
    app.post(path, summary=summary, tags=list(tags), openapi_extra=openapi)(endpoint)


def _install(app: FastAPI, routes: list[FastRoute]) -> None:
    """Put a ``HotPath`` in front of the stack the app builds (lazily, at its first request,
    when every middleware has been added)."""
    build = app.build_middleware_stack

    def build_with_hot_path() -> ASGIApp:
        inner: ASGIApp = HotEndpoint(app)
        for cls, args, kwargs in reversed(app.user_middleware):
            inner = cls(inner, *args, **kwargs)
        return HotPath(routes, inner, build())

    app.build_middleware_stack = build_with_hot_path  # type: ignore[method-assign]


class HotPath:
    """Routes a POST to a hot endpoint through ``hot``, everything else through ``full``."""

    def __init__(self, routes: list[FastRoute], hot: ASGIApp, full: ASGIApp) -> None:
        self.routes = routes
        self.hot = hot
        self.full = full

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            for route in self.routes:
                match, child = route.matches(scope)
                if match is Match.FULL:
                    scope.update(child)
                    await self.hot(scope, receive, send)
                    return
        await self.full(scope, receive, send)


class HotEndpoint:
    """Calls the matched endpoint; an exception becomes the response of the app's handler
    for it (looked up along the exception's class hierarchy, as Starlette does)."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def sender(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        request = Request(scope, receive, sender)
        try:
            response = await scope["endpoint"](request)
            await response(scope, receive, sender)
        except Exception as exc:
            handler = _handler_for(self.app.exception_handlers, exc)
            if handler is None or started:
                raise
            if is_async_callable(handler):
                response = await handler(request, exc)
            else:
                response = await run_in_threadpool(handler, request, exc)
            await response(scope, receive, sender)
            exc.__traceback__ = None  # a reused exception would keep every traceback


def _handler_for(handlers: dict[Any, Any], exc: Exception) -> Any:
    status = getattr(exc, "status_code", None)
    if status is not None and status in handlers and _is_http_exception(exc):
        return handlers[status]
    for cls in type(exc).__mro__:
        if cls in handlers:
            return handlers[cls]
    return handlers.get(500)


def _is_http_exception(exc: Exception) -> bool:
    from starlette.exceptions import HTTPException

    return isinstance(exc, HTTPException)

"""Bearer-token check in front of every route but the health check (a LitServer middleware)."""

from __future__ import annotations

import hmac

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

OPEN_PATHS = frozenset({"/health"})  # load balancers and Kubernetes probes carry no key (as in vLLM, llama.cpp)


class BearerAuthMiddleware:
    """Answer 401, and nothing else, to any HTTP request without ``Authorization: Bearer <api_key>``.

    It runs before routing and body parsing, so an unauthenticated request learns nothing about
    which paths exist or what the server thinks of its body. ``GET /health`` stays open.
    """

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                error = {
                    "message": "missing or invalid API key: send 'Authorization: Bearer <key>'",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "invalid_api_key",
                }
                response = JSONResponse({"error": error}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

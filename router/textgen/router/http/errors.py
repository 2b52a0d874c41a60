"""Error bodies in each route family's shape: TGI's for its routes, OpenAI's under /v1/.

TGI's routes answer `{"error": message, "error_type": kind}`; OpenAI's answer
`{"error": {"message", "type", "param", "code"}}`. Errors raised before a route
is chosen (no API key, a draining server, a request head over the limits, an
unexpected exception) are answered in the shape of the route the path names,
so a client's error handling sees one shape per route whatever went wrong.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from textgen.router.errors import InternalError, RouterError

OPENAI_PREFIX = "/v1/"
# What the client did wrong; any other status (424 shard failure, 503) is the server's.
_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_exceeded",
    431: "invalid_request_error",
}


def error_response(error: RouterError) -> JSONResponse:
    """TGI's shape."""
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers())


def error_json(error: RouterError, names: dict[str, str] | None = None) -> dict[str, Any]:
    """OpenAI's shape; `names` renames TGI's parameters in the message to the client's."""
    message, param = error.message, getattr(error, "param", None)
    for tgi_name, openai_name in (names or {}).items():
        if f"`{tgi_name}`" in message:
            message = message.replace(f"`{tgi_name}`", f"`{openai_name}`")
            param = param or openai_name
    kind = _OPENAI_TYPES.get(error.status, "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": error.error_type}}


def openai_error(error: RouterError, names: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_json(error, names), status_code=error.status, headers=error.headers())


def route_error(path: str, error: RouterError) -> JSONResponse:
    """The error in the shape of the route family `path` belongs to."""
    return openai_error(error) if path.startswith(OPENAI_PREFIX) else error_response(error)


async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    """The last resort: an exception no handler turned into a RouterError.

    Every known bad input is refused with a 4xx where it is read; reaching this
    is a bug. The client still gets the route's JSON shape, and Starlette
    re-raises the exception after this answer, so the server logs it once
    with its traceback ("Exception in ASGI application").
    """
    error = InternalError(f"Internal server error ({type(exc).__name__})")
    return route_error(request.url.path, error)

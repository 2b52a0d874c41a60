"""Errors the router answers with, in TGI's JSON shape and status codes."""

from __future__ import annotations


class RouterError(Exception):
    """An error a client sees: `{"error": message, "error_type": error_type}` with `status`."""

    status = 500
    error_type = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def body(self) -> dict[str, str]:
        return {"error": self.message, "error_type": self.error_type}

    def headers(self) -> dict[str, str]:
        return {}


class InternalError(RouterError):
    """A bug: an exception no handler expected (answered 500 in the route's shape)."""


class UnauthorizedError(RouterError):
    status = 401
    error_type = "unauthorized"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class UnsupportedMediaTypeError(RouterError):
    """A JSON route's body not declared `application/json` (as TGI's router: 415)."""

    status = 415
    error_type = "validation"


class HeadersTooLargeError(RouterError):
    status = 431
    error_type = "validation"


class ShuttingDownError(RouterError):
    """The server is draining: new requests are refused, late ones are ended."""

    status = 503
    error_type = "unavailable"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1", "Connection": "close"}


class ValidationError(RouterError):
    status = 422
    error_type = "validation"


class JsonSyntaxError(RouterError):
    """The body is not JSON (TGI's JSON extractor answers 400)."""

    status = 400
    error_type = "validation"


class PayloadTooLargeError(RouterError):
    status = 413
    error_type = "payload_too_large"


class OverloadedError(RouterError):
    status = 429
    error_type = "overloaded"

    def __init__(self) -> None:
        super().__init__("Model is overloaded")

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class GenerationError(RouterError):
    """The shards failed a step that the request took part in."""

    status = 424
    error_type = "generation"


class UnhealthyError(RouterError):
    status = 503
    error_type = "unhealthy"
